"""What both services share, below both: where a model's files are (model_spec), child processes
tied to their parent (lifecycle), typed options from the command line (options). Imports neither
service, nor torch."""

from sarathi.gateway.main import main

main()

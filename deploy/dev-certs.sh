#!/usr/bin/env bash
# A development CA and certificates for TLS on the API and mutual TLS between the services.
# Not for production: keys are unencrypted and the CA lives beside them.
#
#   deploy/dev-certs.sh DIR [NAME...]
#
# writes DIR/ca.pem and DIR/ca.key (the CA), and, each as NAME.pem + NAME.key:
#   server   the API's certificate (localhost, 127.0.0.1 and each NAME: a host name or an IP)
#   client   a client certificate for the API's mutual TLS (--tls-client-ca-file)
#   scheduler, worker, router
#            the internal links' certificates (--internal-cert-file/--internal-key-file, with
#            --internal-ca-file DIR/ca.pem), each good for both ends of a TLS link; valid for
#            localhost, 127.0.0.1, each NAME and its role's name: sarathi-scheduler,
#            sarathi-worker, sarathi-router (workers are dialled by IP: the scheduler checks that
#            name with --internal-peer-name sarathi-worker)
# Then, for example:
#
#   sarathi serve --tls-cert-file DIR/server.pem --tls-key-file DIR/server.key
#   Client("127.0.0.1:50051", tls=TLS(ca_file="DIR/ca.pem"))
#   sarathi scheduler --internal-port 50052 --internal-ca-file DIR/ca.pem \
#     --internal-cert-file DIR/scheduler.pem --internal-key-file DIR/scheduler.key \
#     --internal-peer-name sarathi-worker
#   sarathi worker --scheduler 127.0.0.1:50052 --internal-ca-file DIR/ca.pem \
#     --internal-cert-file DIR/worker.pem --internal-key-file DIR/worker.key
#
# Only file names are printed: no key is ever written to the terminal or a log.
set -euo pipefail
dir=${1:?usage: $0 DIR [NAME...]}
shift
mkdir -p "$dir"
umask 077
days=825
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/ca.key" -out "$dir/ca.pem" -days "$days" \
  -subj "/CN=sarathi development CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # issue NAME EXTENSIONS
  openssl req -newkey rsa:2048 -nodes -keyout "$dir/$1.key" -out "$dir/$1.csr" -subj "/CN=sarathi $1" \
    2>/dev/null
  openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/$1.pem" -days "$days" -extfile <(printf '%s\n' "$2") 2>/dev/null
  rm -f "$dir/$1.csr"
}
issue server "subjectAltName=$san
extendedKeyUsage=serverAuth"
issue client "extendedKeyUsage=clientAuth"
for role in scheduler worker router; do
  issue "$role" "subjectAltName=$san,DNS:sarathi-$role
extendedKeyUsage=serverAuth,clientAuth"
done
rm -f "$dir/ca.srl"
chmod 644 "$dir"/*.pem
echo "$dir: ca.pem, server.pem/key ($san), client.pem/key; internal: scheduler, worker, router .pem/key"

#!/bin/sh
# Import the pipeline's RabbitMQ topology, users and permissions into the running broker.
#
#   deploy/rabbitmq/apply-definitions.sh [DEFINITIONS.json]      (default: definitions.json beside it)
#
# Uses `rabbitmqctl import_definitions` (RabbitMQ 3.8+; no management plugin needed). Run it as a
# user that may talk to the node (root or rabbitmq); RABBITMQCTL overrides the command, e.g.
# RABBITMQCTL="sudo rabbitmqctl -n rabbit@broker-1". Importing is idempotent: exchanges, queues and
# bindings that exist are left alone, permissions and users are (re)set.
#
# Users are imported with the DEV passwords of deploy/README.md unless these are set, in which
# case their hashes are computed here (salted SHA-256, as rabbit_password_hashing_sha256 defines
# it) and imported instead, so no password ever appears on a command line:
#   BINDPIPE_RABBITMQ_PUBLISHER_PASSWORD   for the user ending in "bindpipe-publisher"
#   BINDPIPE_RABBITMQ_WORKER_PASSWORD      for the user ending in "bindpipe-worker"
#   BINDPIPE_RABBITMQ_COMPUTE_PASSWORD     for the user ending in "bindpipe-compute"
# Re-running without them resets those users to the dev passwords.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
file=${1:-$here/definitions.json}
rabbitmqctl=${RABBITMQCTL:-rabbitmqctl}

if [ ! -r "$file" ]; then
    echo "apply-definitions: cannot read $file" >&2
    exit 2
fi

if [ -n "${BINDPIPE_RABBITMQ_PUBLISHER_PASSWORD:-}${BINDPIPE_RABBITMQ_WORKER_PASSWORD:-}${BINDPIPE_RABBITMQ_COMPUTE_PASSWORD:-}" ]; then
    tmp=$(umask 077 && mktemp)
    trap 'rm -f "$tmp"' EXIT
    python3 - "$file" >"$tmp" <<'PY'
import base64, hashlib, json, os, sys

definitions = json.load(open(sys.argv[1]))
for user in definitions.get("users", []):
    for role in ("publisher", "worker", "compute"):
        password = os.environ.get(f"BINDPIPE_RABBITMQ_{role.upper()}_PASSWORD")
        if password and user["name"].endswith(f"bindpipe-{role}"):
            salt = os.urandom(4)
            user["password_hash"] = base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()
            user["hashing_algorithm"] = "rabbit_password_hashing_sha256"
            print(f"apply-definitions: {user['name']}: password from BINDPIPE_RABBITMQ_{role.upper()}_PASSWORD",
                  file=sys.stderr)
json.dump(definitions, sys.stdout)
PY
    file=$tmp
fi

# The file goes in on standard input: Debian's rabbitmqctl wrapper re-runs itself as the rabbitmq
# user from /var/lib/rabbitmq, which could neither resolve a relative path nor read a private file.
# $rabbitmqctl is split on purpose: it may carry sudo or node options.
$rabbitmqctl --quiet import_definitions --format json <"$file"
echo "apply-definitions: imported $file"

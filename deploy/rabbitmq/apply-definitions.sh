#!/bin/sh
# Import the pipeline's RabbitMQ topology, users and permissions into the running broker.
#
#   deploy/rabbitmq/apply-definitions.sh [--vhost NAME] [--admin USER]... [DEFINITIONS.json]
#
#   --vhost NAME   the vhost to import into (default: bindpipe, the one the file names)
#   --admin USER   the operator's administrator, given every permission on the vhost so that it can
#                  still manage it (`bindpipe declare`, `bindpipe status`, dead-letter queues);
#                  repeatable. Default: every user tagged administrator on the node.
#   DEFINITIONS    default: definitions.json beside this script
#
# Uses `rabbitmqctl import_definitions` (RabbitMQ 3.8+; no management plugin needed). Run it as a
# user that may talk to the node (root or rabbitmq); RABBITMQCTL overrides the command, e.g.
# RABBITMQCTL="sudo rabbitmqctl -n rabbit@broker-1". Importing is idempotent: exchanges, queues and
# bindings that exist are left alone, permissions and users are (re)set. Compute hosts get their
# users and queues one by one afterwards: `bindpipe broker add-compute-host HOST --vhost NAME`.
#
# Users are imported with the DEV passwords of deploy/README.md unless these are set, in which
# case their hashes are computed here (salted SHA-256, as rabbit_password_hashing_sha256 defines
# it) and imported instead, so no password ever appears on a command line:
#   BINDPIPE_RABBITMQ_PUBLISHER_PASSWORD   for the user ending in "bindpipe-publisher"
#   BINDPIPE_RABBITMQ_WORKER_PASSWORD      for the user ending in "bindpipe-worker"
# Re-running without them resets those users to the dev passwords.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
file=$here/definitions.json
vhost=bindpipe
admins=
rabbitmqctl=${RABBITMQCTL:-rabbitmqctl}

usage() {
    echo "usage: apply-definitions.sh [--vhost NAME] [--admin USER]... [DEFINITIONS.json]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case $1 in
        --vhost) [ $# -ge 2 ] && [ -n "$2" ] || usage; vhost=$2; shift 2 ;;
        --admin) [ $# -ge 2 ] && [ -n "$2" ] || usage; admins="$admins$2
"; shift 2 ;;
        -*) usage ;;
        *) file=$1; shift ;;
    esac
done

if [ ! -r "$file" ]; then
    echo "apply-definitions: cannot read $file" >&2
    exit 2
fi
if [ -n "${BINDPIPE_RABBITMQ_COMPUTE_PASSWORD:-}" ]; then
    echo "apply-definitions: BINDPIPE_RABBITMQ_COMPUTE_PASSWORD: there is no shared compute user any more;" \
         "each compute host gets its own with \`bindpipe broker add-compute-host HOST\`" >&2
    exit 2
fi
if [ -z "$admins" ]; then
    users=$($rabbitmqctl --quiet list_users --formatter json)
    admins=$(printf '%s' "$users" | python3 -c '
import json, sys
print("\n".join(u["user"] for u in json.load(sys.stdin) if "administrator" in u["tags"]))')
fi

tmp=$(umask 077 && mktemp)
trap 'rm -f "$tmp"' EXIT
BINDPIPE_VHOST=$vhost BINDPIPE_ADMINS=$admins python3 - "$file" >"$tmp" <<'PY'
import base64, hashlib, json, os, sys

definitions = json.load(open(sys.argv[1]))
vhost = os.environ["BINDPIPE_VHOST"]
if len(definitions["vhosts"]) != 1:
    sys.exit(f"apply-definitions: {sys.argv[1]} must define exactly one vhost")
definitions["vhosts"][0]["name"] = vhost
for section in ("permissions", "topic_permissions", "queues", "exchanges", "bindings", "policies", "parameters"):
    for item in definitions.get(section, []):
        item["vhost"] = vhost
for admin in filter(None, os.environ["BINDPIPE_ADMINS"].splitlines()):
    definitions["permissions"].append({"user": admin, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
    print(f"apply-definitions: {admin}: every permission on vhost {vhost}", file=sys.stderr)
for user in definitions.get("users", []):
    for role in ("publisher", "worker"):
        password = os.environ.get(f"BINDPIPE_RABBITMQ_{role.upper()}_PASSWORD")
        if password and user["name"].endswith(f"bindpipe-{role}"):
            salt = os.urandom(4)
            user["password_hash"] = base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()
            user["hashing_algorithm"] = "rabbit_password_hashing_sha256"
            print(f"apply-definitions: {user['name']}: password from BINDPIPE_RABBITMQ_{role.upper()}_PASSWORD",
                  file=sys.stderr)
json.dump(definitions, sys.stdout)
PY

# The file goes in on standard input: Debian's rabbitmqctl wrapper re-runs itself as the rabbitmq
# user from /var/lib/rabbitmq, which could neither resolve a relative path nor read a private file.
# $rabbitmqctl is split on purpose: it may carry sudo or node options.
$rabbitmqctl --quiet import_definitions --format json <"$tmp"
echo "apply-definitions: imported $file into vhost $vhost"

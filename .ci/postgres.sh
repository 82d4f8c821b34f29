# Sourced by .ci/run (as root): install Debian's PostgreSQL, start its cluster as the postgres user,
# create a user and a database for the tuning tests, export DSV4_TEST_POSTGRES_URL. Idempotent.
export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
pg_version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_main() { pg_lsclusters -h | awk -v v="$pg_version" '$1 == v && $2 == "main"'; }
[ -n "$(pg_main)" ] || pg_createcluster "$pg_version" main
[ "$(pg_main | awk '{print $4}')" = online ] || pg_ctlcluster "$pg_version" main start   # runs as postgres
pg_port=$(pg_main | awk '{print $3}')
pg_sql() { (cd / && runuser -u postgres -- psql -p "$pg_port" -qtAc "$1"); }
[ "$(pg_sql "SELECT 1 FROM pg_roles WHERE rolname = 'dsv4'")" = 1 ] || pg_sql "CREATE ROLE dsv4 LOGIN PASSWORD 'dsv4'"
[ "$(pg_sql "SELECT 1 FROM pg_database WHERE datname = 'dsv4_tuning'")" = 1 ] || pg_sql "CREATE DATABASE dsv4_tuning OWNER dsv4"
export DSV4_TEST_POSTGRES_URL="postgresql+psycopg://dsv4:dsv4@localhost:${pg_port}/dsv4_tuning"
echo "PostgreSQL $pg_version (port $pg_port) for the tuning tests: DSV4_TEST_POSTGRES_URL set"

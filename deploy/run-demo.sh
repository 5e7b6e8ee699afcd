#!/usr/bin/env bash
# `make run`: a local Kafka, the worker with /health and /metrics, the seed
# cohort published, and the alerts printed as they arrive. Ctrl-C stops all
# of it (the broker only if this script started it).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
KAFKA=deploy/kafka/kafka.sh
COHORT=${TRIALWATCH_DEMO_COHORT:-trialwatch-data/demo-cohort.jsonl}
PORT=${TRIALWATCH_WEB_PORT:-6066}
mkdir -p trialwatch-data
worker_pid=""
started_kafka=""

cleanup() {
  # Finish cleaning up even if the terminal goes away or a second Ctrl-C comes.
  trap '' INT TERM HUP PIPE
  trap - EXIT
  echo 2>/dev/null || true
  if [ -n "$worker_pid" ] && kill -0 "$worker_pid" 2>/dev/null; then
    echo "stopping the worker (pid $worker_pid)" 2>/dev/null || true
    kill -TERM "$worker_pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$worker_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$worker_pid" 2>/dev/null || true
  fi
  # The broker we started; KAFKA_BOOTSTRAP_SERVERS was exported for our
  # children and would make kafka.sh treat it as someone else's.
  if [ -n "$started_kafka" ]; then env -u KAFKA_BOOTSTRAP_SERVERS "$KAFKA" stop 2>/dev/null || true; fi
}
trap cleanup INT TERM HUP EXIT

if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  "$KAFKA" start
  started_kafka=1
fi
export KAFKA_BOOTSTRAP_SERVERS=${KAFKA_BOOTSTRAP_SERVERS:-$("$KAFKA" bootstrap)}

"$BIN/trialwatch" topics
# Tokens of the DSMB page and API: yours if set, else fresh ones for this run.
export TRIALWATCH_DSMB_TOKEN=${TRIALWATCH_DSMB_TOKEN:-$("$BIN/python" -c 'import secrets; print(secrets.token_hex(16))')}
export TRIALWATCH_MASKED_TOKEN=${TRIALWATCH_MASKED_TOKEN:-$("$BIN/python" -c 'import secrets; print(secrets.token_hex(16))')}
TRIALWATCH_WEB_PORT=$PORT "$BIN/trialwatch" worker >trialwatch-data/worker.log 2>&1 &
worker_pid=$!
echo "worker started (pid $worker_pid), log: trialwatch-data/worker.log"

# Ready when it owns partitions and has recovered its table.
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/health" 2>/dev/null | grep -q '"consuming": *true'; then break; fi
  kill -0 "$worker_pid" 2>/dev/null || { echo "the worker exited; its log:"; tail -n 40 trialwatch-data/worker.log; exit 1; }
  sleep 0.5
done
echo "health:  http://127.0.0.1:$PORT/health"
echo "metrics: http://127.0.0.1:$PORT/metrics"
echo "DSMB page: http://127.0.0.1:$PORT/  (sign in with the DSMB token $TRIALWATCH_DSMB_TOKEN;"
echo "           the masked token $TRIALWATCH_MASKED_TOKEN shows the blinded view)"

# The synthetic cohort of seeds/demo-cohort.template.jsonl, dated relative to
# today so that the clock-driven rules (SBRT window) show as well.
[ -n "${TRIALWATCH_DEMO_COHORT:-}" ] || "$BIN/trialwatch" demo-cohort > "$COHORT"
# Enrolments first, as in life (weeks before any lab): Kafka does not order
# records across topics, and an alert raised before its subject's enrolment
# is read carries no arm.
grep '"trial.enrollment.v1"' "$COHORT" | "$BIN/trialwatch" publish -
sleep 2
grep -v '"trial.enrollment.v1"' "$COHORT" | "$BIN/trialwatch" publish -
# Then the trial at its planned size: 70 generated subjects (codes TWS-…),
# enrolled over the last five months, as their records stand today.
SEEDED=trialwatch-data/seed-cohort.jsonl
"$BIN/trialwatch" seed --subjects 70 --seed 2026 --start "$(date -u -d '-150 days' +%F)" --until now > "$SEEDED"
grep '"trial.enrollment.v1"' "$SEEDED" | "$BIN/trialwatch" publish -
sleep 2
grep -v '"trial.enrollment.v1"' "$SEEDED" | "$BIN/trialwatch" publish -
echo
echo "DSMB alerts (unblinded stream trial.alerts.v1); Ctrl-C to stop everything:"
"$BIN/trialwatch" alerts

#!/bin/bash
# A fresh clone and a fresh HOME: the README's two set-up commands, then each line of its Train block, as printed.
# bash benchmarks/readme_check.sh > readme_check.out  (about 50 minutes on 2 cores; logs in /tmp/readme_check.*.log)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
rm -rf /tmp/fresh /tmp/freshhome && mkdir -p /tmp/freshhome
git clone -q "$REPO" /tmp/fresh && cd /tmp/fresh
export HOME=/tmp/freshhome CI=true
run() { local start=$(date +%s); echo ">>> $*"; bash -c "$*" > /tmp/readme_check.$2.log 2>&1; local rc=$?; echo "<<< rc=$rc $(( $(date +%s) - start )) s: $*"; tail -3 /tmp/readme_check.$2.log; }
echo "commit $(git rev-parse --short HEAD)"
run make train
run make test
# the Train section's block, line by line, as printed
awk '/^## Train$/{f=1} f&&/^```bash$/{b=1;next} b&&/^```$/{exit} b{print}' README.md | sed 's/ *#.*$//' > /tmp/readme_train_cmds.txt
source .venv/bin/activate
n=0
while IFS= read -r cmd; do
  [ -z "$cmd" ] && continue
  n=$((n+1))
  if [[ "$cmd" == source* ]]; then echo "(sourced above) $cmd"; continue; fi
  start=$(date +%s); echo ">>> $cmd"
  bash -c "$cmd" > /tmp/readme_check.cmd$n.log 2>&1 < /dev/null; rc=$?
  echo "<<< rc=$rc $(( $(date +%s) - start )) s: $cmd"; tail -2 /tmp/readme_check.cmd$n.log
done < /tmp/readme_train_cmds.txt
echo "README CHECK DONE"

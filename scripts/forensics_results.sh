#!/usr/bin/env bash
# The accuracy tables of the README, end to end from a trained run:
#   scripts/forensics_results.sh RUN_DIR NAME [SEEDS] [EXTRA_SEEDS]
# records the paired worst-action protocol and the FGSM/PGD stores over SEEDS (default 0:500),
# the other faults over EXTRA_SEEDS (default 0:200), a clean calibration store over seeds that
# no scored store uses (100000:101000), diagnoses every store with our instrument
# (forensics=default), with the paper's Stage-1 statistic and a band pooled over other seeds
# (forensics=paper_pooled, log-only: not the paper's same-seed protocol) and, for observation
# attacks, with ours reading the environment's own observation (obs_true), and writes
# results/NAME.md and results/NAME.parquet. Re-running resumes: finished stores are skipped.
# ATTACKS / EXTRA_ATTACKS (environment) choose the attacks recorded over SEEDS / EXTRA_SEEDS.
set -euo pipefail
RUN=${1:?usage: scripts/forensics_results.sh RUN_DIR NAME [SEEDS] [EXTRA_SEEDS]}
NAME=${2:?usage: scripts/forensics_results.sh RUN_DIR NAME [SEEDS] [EXTRA_SEEDS]}
SEEDS=${3:-0:500}
EXTRA=${4:-0:200}
BIN=${BIN:-.venv/bin}
STORES=stores/$NAME
mkdir -p "$STORES" results

"$BIN/forensics" rollout "$RUN" -o "$STORES/clean" --seeds 100000:101000 --no-progress attack=none
diags=()
record() {  # record(attack, seeds): one store, diagnosed twice
  local attack=$1 seeds=$2 store=$STORES/$1
  "$BIN/forensics" rollout "$RUN" -o "$store" --seeds "$seeds" --no-progress "attack=$attack"
  "$BIN/forensics" diagnose "$store" --run "$RUN" -c "$STORES/clean" -o "$store/diagnosis" \
    --no-progress forensics=default
  "$BIN/forensics" diagnose "$store" --run "$RUN" -c "$STORES/clean" -o "$store/diagnosis-paper" \
    --no-progress forensics=paper_pooled
  diags+=("$store/diagnosis" "$store/diagnosis-paper")
  if [[ $attack == obs_* ]]; then  # the env's own observation: needs a log apart from the sensors
    "$BIN/forensics" diagnose "$store" --run "$RUN" -c "$STORES/clean" -o "$store/diagnosis-true" \
      --no-progress forensics=default forensics.observations=obs_true
    diags+=("$store/diagnosis-true")
  fi
}
for attack in ${ATTACKS:-worst_action obs_fgsm obs_pgd}; do record "$attack" "$SEEDS"; done
for attack in ${EXTRA_ATTACKS-stuck_actuator action_noise param_noise obs_gaussian}; do
  record "$attack" "$EXTRA"
done
"$BIN/forensics" evaluate "${diags[@]}" --out "results/$NAME.parquet" --markdown "results/$NAME.md"

# shellcheck shell=bash
# Sourced by the benchmark scripts.

newest_adapter() {  # a run's final/ adapter, else its newest step-* checkpoint (what a time box left)
  if [ -d "$1/final" ]; then echo "$1/final"; else find "$1" -maxdepth 1 -name "step-*" | sort | tail -n 1; fi
}

# Sourced by tools/setup-env.sh and tools/setup-lmcache-env.sh (from the repository root):
# `pin NAME` prints NAME's version from overlay/vllm_ampere/pins.py, the one place it is written.
pin() { sed -n "s/^$1 = \"\(.*\)\"/\1/p" overlay/vllm_ampere/pins.py; }

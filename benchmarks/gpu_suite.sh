#!/usr/bin/env bash
# The GPU figures in one device call: install the carried wheels, print the versions, run
# the gpu tests, then the GPU benchmarks, each under a time limit and all of them under
# one deadline (SUITE_SECONDS, 540 s by default), so that the call ends inside its
# 10 minutes. Logs go to $OUT (8 files at most: env.txt, pytest.log, decode.log,
# concurrent.log, hop.log, swarm.log, results.json, summary.txt); a summary table is
# printed last.
#
# Here, first:   bash scripts/device-wheels.sh     (fills .whl/ and writes .whl/REVISION)
# Device call:   command "bash benchmarks/gpu_suite.sh", carry [".whl"], timeout_s 600
#
# SUITE_STEPS="pytest decode" runs only those steps (default: all five).
# SUITE_QUICK=1 shrinks every benchmark (a smoke run of the script itself; on a machine
# without CUDA the benchmarks run in their reduced CPU form). A CPU smoke run here:
#   SUITE_NO_WHEELS=1 PYTHON=.venv/bin/python SUITE_SECONDS=280 bash benchmarks/gpu_suite.sh
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-suite-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
SUITE_SECONDS=${SUITE_SECONDS:-540}
DEADLINE=$((SECONDS + SUITE_SECONDS))
PYTHON=${PYTHON:-python3}
# Which steps run (a subset splits the suite over two device calls).
SUITE_STEPS=${SUITE_STEPS:-pytest decode concurrent hop swarm}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Single GPU, but keep NVLink multicast off as the machine's notes ask.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

declare -A STATUS=()

# run_step NAME LIMIT_S LOG COMMAND...: COMMAND under `timeout`, cut to what the deadline
# leaves (minus 20 s for the summary); output appended to $OUT/LOG and to stdout's tail.
run_step() {
    local name=$1 limit=$2 log=$OUT/$3
    shift 3
    if [[ " $SUITE_STEPS " != *" $name "* ]]; then
        STATUS[$name]="not selected"
        return
    fi
    local left=$((DEADLINE - SECONDS - 20))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "== $name: skipped, the deadline is near" | tee -a "$log"
        STATUS[$name]="skipped (deadline)"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    local began=$SECONDS first_line
    first_line=$(($(wc -l <"$log") + 1))
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    STATUS[$name]="rc=$rc in $((SECONDS - began))s"
    ((rc == 124 || rc == 137)) && STATUS[$name]="timed out after ${limit}s"
    tail -n +"$first_line" "$log" | tail -n 25
    echo "== $name: ${STATUS[$name]}" | tee -a "$log"
}

# 1. wheels and versions ---------------------------------------------------------------------
if [[ ${SUITE_NO_WHEELS:-0} != 1 ]] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$ROOT/src:$ROOT
else
    export PYTHONPATH=$ROOT/src:$ROOT
fi
{
    echo "git: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || cat .whl/REVISION 2>/dev/null || echo unknown)"
    echo "date: $(date -u +%FT%TZ)"
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
for name in ("transformers", "bitsandbytes", "msgspec", "cryptography", "kademlia", "pytest", "pytest_asyncio"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # report, don't stop: the steps below say what it breaks
        print(name, "NOT IMPORTABLE:", repr(error))
EOF
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv 2>&1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [[ $CUDA == 1 ]]; then DEVICE=cuda; else DEVICE=cpu; fi

# 2. tests ------------------------------------------------------------------------------------
run_step pytest 150 pytest.log "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rs tests/gpu

# 3. benchmarks --------------------------------------------------------------------------------
if [[ ${SUITE_QUICK:-0} == 1 || $DEVICE == cpu ]]; then
    DECODE=(--shapes tiny --batches 1,4 --steps 10 --quant int8,nf4)
    CONCURRENT=(--sessions 4 --steps 8 --rounds 1 --blocks 6)
    HOP=(--hidden 256 --layers 2 --iterations 50 --steps 20 --rounds 1)
    SWARM=(--hidden 256 --layers 4 --steps 20 --rounds 1)
else
    DECODE=(--shapes 8b,70b --batches 1,32 --steps 50 --quant int8,nf4)
    # the issue's shapes: 32 sessions on one host (8B-shaped 8-block span); the swarm of
    # 2 hosts over hidden 4096 x 32 blocks
    CONCURRENT=(--level runtime --sessions 32 --steps 16 --rounds 1 --hidden 4096 --layers 8)
    HOP=(--hidden 4096 --layers 2 --iterations 200 --steps 50 --rounds 2)
    SWARM=(--hidden 4096 --layers 32 --steps 60 --rounds 2)
fi
# SWARM_LIMIT: the swarm step's seconds (its 12 GB checkpoint, two hosts loading, measuring
# and capturing, then the local baselines take minutes on the H200 machine).
run_step swarm "${SWARM_LIMIT:-190}" swarm.log "$PYTHON" -m benchmarks.gpu_swarm_speed \
    --device "$DEVICE" "${SWARM[@]}" --json "$WORK/swarm.json" --host-logs "$WORK/hosts"
for log in "$WORK"/hosts/host*.log; do  # the hosts' last lines, also after a timeout
    [[ -f $log ]] && { echo "-- $(basename "$log"), last lines:"; tail -n 15 "$log"; } >>"$OUT/swarm.log"
done
run_step decode 240 decode.log "$PYTHON" -m benchmarks.gpu_decode_speed --device "$DEVICE" \
    "${DECODE[@]}" --json "$WORK/decode.json"
run_step quant 60 decode.log "$PYTHON" -m benchmarks.gpu_decode_speed --device "$DEVICE" \
    "${DECODE[@]}" --quant-only --json "$WORK/quant.json"
run_step concurrent 100 concurrent.log "$PYTHON" -m benchmarks.concurrent_sessions \
    --device "$DEVICE" "${CONCURRENT[@]}" --json "$WORK/concurrent.json"
run_step hop 80 hop.log "$PYTHON" -m benchmarks.hop_breakdown --device "$DEVICE" "${HOP[@]}" \
    --json "$WORK/hop.json"

# 4. summary --------------------------------------------------------------------------------------
for name in pytest decode quant concurrent hop swarm; do
    echo "$name=${STATUS[$name]:-not run}"
done >"$WORK/status.txt"
grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran" "$OUT/pytest.log" | tail -1 >"$WORK/pytest_line.txt"
"$PYTHON" - "$WORK" "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
def load(name):
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None

results = {name: load(name) for name in ("decode", "concurrent", "hop", "swarm")}
results["status"] = dict(line.split("=", 1) for line in (work / "status.txt").read_text().splitlines())
(out / "results.json").write_text(json.dumps(results, indent=1))
print("== GPU suite summary")
print("\n".join(out.joinpath("env.txt").read_text().splitlines()[:4]))
for name, status in results["status"].items():
    print(f"  {name:<11} {status}")
print("  pytest:", (work / "pytest_line.txt").read_text().strip())
decode = results["decode"]
if decode:
    print(f"decode ({decode['bandwidth_gbs']:.0f} GB/s copy): shape B variant ms/step tok/s of-floor rel-err")
    for r in decode["rows"]:
        err = "" if r["error"] is None else f"{r['error']:.1e}"
        print(f"  {r['shape']:<5}{r['batch']:>3} {r['variant']:<11}{r['ms']:>9.3f}{r['tokens_s']:>9.0f}"
              f"{r['of_floor']:>7.2f}{err:>9}  {r['note'][:40]}")
conc = results["concurrent"]
if conc:
    print("concurrent sessions (tokens/s: 1 session, N sessions, ratio):")
    for name, rates in conc["results"].items():
        if "1" in rates:
            many = [v for k, v in rates.items() if k.isdigit() and k != "1"]
            print(f"  {name:<26}{rates['1']:>9.1f}{many[0]:>10.1f}{many[0] / rates['1']:>7.2f}x")
        elif "ratio" in rates:
            print(f"  {'1 session swarm / local':<26}{rates['ratio']:>9.2f}x")
hop = results["hop"]
if hop:
    stages = hop["stages_us"]
    print("hop stages (us): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    if hop.get("end_to_end_ms"):
        e2e = hop["end_to_end_ms"]
        print(f"  hop added {e2e['graphs'] * 1e3:.0f} us over graphs, {e2e['eager'] * 1e3:.0f} us over eager; ping {e2e['ping_ms'] * 1e3:.0f} us")
swarm = results["swarm"]
if swarm:
    rates = swarm["rates_steps_s"]
    print("swarm speed (steps/s): " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
          + "; added ms/hop: " + ", ".join(f"vs {k} {v:.2f}" for k, v in swarm["added_ms_per_hop"].items())
          + f"; ping {swarm['ping_ms']:.2f} ms")
    hosts = swarm.get("hosts")
    if hosts:
        print(f"  per step, hosts' runtimes {hosts['runtime_ms']:.2f} ms (decode compute "
              f"{hosts['decode_ms']:.2f}), outside them {hosts['outside_ms']:.2f} ms; graphs "
              f"{hosts['rounds'][-1]['graphs_captured']}")
EOF
rm -rf "$WORK"

#!/usr/bin/env bash
# One-command GPU check (issue 13), about 5 minutes on one GPU, everything written under one folder:
#   1. the `gpu`-marked tests                      -> gpu-tests.log, gpu-tests.xml
#   2. the kernel suites on CUDA (pytest-benchmark) -> kernels.log, kernels.json   (16M elements)
#   3. gradcodec bench --device cuda --peers        -> bench-16M.{log,json}, bench-256M.{log,json}
# plus env.txt (GPU, driver, torch) and summary.txt (each step's exit status and seconds).
#
#   benchmarks/gpu_check.sh [FOLDER]        FOLDER defaults to $OUT, else gpu-check-<date>
#   benchmarks/gpu_check.sh --cpu [FOLDER]  dry run of the same steps on CPU at small sizes (tests the script)
#
# Without CUDA (and without --cpu) it says so and exits 0 having measured nothing. Each step has its
# own time limit, so one hung step cannot take the whole budget; the exit status is 1 if any step failed.
set -u

device=cuda
if [ "${1:-}" = "--cpu" ]; then
    device=cpu
    shift
fi
folder=${1:-${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
python=${PYTHON:-python}

if [ "$device" = cuda ] && ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing measured."
    echo "gpu_check: run it on a GPU machine, or with --cpu for a dry run of the steps on CPU."
    exit 0
fi

mkdir -p "$folder" || exit 2
folder=$(cd "$folder" && pwd)
if [ "$device" = cuda ]; then
    sizes=(16M 256M)
    kernel_n=16M
    gpu_tests=(tests)
    kernel_suites=(benchmarks -k cuda)
    limits=(60 75 75 90)  # seconds: gpu tests, kernel suites, bench 16M, bench 256M
else
    sizes=(64K 256K)
    kernel_n=64K
    gpu_tests=(tests/test_kernels.py tests/test_kernels_canvas.py)
    kernel_suites=(benchmarks/test_kernel_speed.py -k "cpu and quantize")
    limits=(120 120 120 120)
fi
# AdaQuant runs on the CPU (as FLARE does) with bz2: at 256M elements it alone would take minutes
peers_by_size=(all "bnb:int8,bnb:nf4,bnb:fp4,torch:powersgd,torch:fp16,torch:bf16")

{
    echo "device: $device"
    date -u
    git -C "$repo" rev-parse HEAD 2>/dev/null
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
                  torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
    command -v nvidia-smi >/dev/null && nvidia-smi
} > "$folder/env.txt" 2>&1

failed=0
: > "$folder/summary.txt"
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to NAME.log, record the outcome
    local name=$1 limit=$2 start status
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$folder/$name.log" 2>&1
    status=$?
    printf '%-12s exit %-3s %4ss  %s\n' "$name" "$status" "$(( $(date +%s) - start ))" "$*" | tee -a "$folder/summary.txt"
    [ "$status" -eq 0 ] || failed=1
}

step gpu-tests "${limits[0]}" "$python" -m pytest -q -m gpu "${gpu_tests[@]}" --junitxml="$folder/gpu-tests.xml"
step kernels "${limits[1]}" env GRADCODEC_BENCH_N="$kernel_n" "$python" -m pytest -q "${kernel_suites[@]}" \
    --benchmark-only --benchmark-json="$folder/kernels.json"
cd "$folder" || exit 2  # not the repository root, where ./gradcodec would shadow the installed package
for i in 0 1; do
    step "bench-${sizes[$i]}" "${limits[$((i + 2))]}" "${GRADCODEC:-gradcodec}" bench --device "$device" \
        --size "${sizes[$i]}" --peers "${peers_by_size[$i]}" --json "$folder/bench-${sizes[$i]}.json"
done

echo "gpu_check: results in $folder"
exit $failed

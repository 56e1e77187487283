#!/usr/bin/env bash
# One prepared check of the CUDA paths, for whenever a machine with one GPU is at hand.
#
#     PYTHON=/path/to/python bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs a Python environment with a CUDA build of torch, fairseq-fixed, fairscale and this
# package: run/setup.sh installs torch's CPU build, so on a GPU machine install torch's
# CUDA wheel in its place first, or, on a machine without a network that has torch
# already, use benchmarks/gpu_env/ (pack.sh here, install_offline.sh there).
# Every step has its own time limit; the whole script stays under 10 minutes on one
# GPU. It never stops at a failed step: it prints PASS/FAIL/SKIP for each at the end,
# and writes logs and JSON to OUT_DIR ($OUT, else ./gpu-check).
#
# Steps:
#   1. the device: name, compute capability, whether torch's grouped product is fused
#   2. the grouped product on CUDA equals the portable loop (bf16, forward and backward)
#   3. offloaded experts on CUDA (pinned host memory, side-stream copies): the same
#      scores and beam-5 hypotheses as the resident model (tests/test_offload_cuda.py)
#   4. offloaded experts' scoring speed and device memory against all resident
#      (benchmarks/gpu_offload_speed.py)
#   5. no host-device synchronisation inside a hash layer: one training step of a tiny
#      hash LM with torch.cuda.set_sync_debug_mode("warn"), syncs counted by where
#   6. the layer benchmark in bf16 (fairseq-hash-bench, K=16 and 64, 8192 tokens)
#   7. an fp16 training run that saves, then resumes from its checkpoint; 7b: whether
#      fairseq-train's --bf16 (which "implies --tpu") runs on a GPU at all
#   8. 2-process NCCL expert parallelism on one GPU (NCCL may refuse two ranks on one
#      device: the step then says so and is SKIP, not FAIL)
#
# GPU_CHECK_STEPS="1 3" runs only the steps named (by number); the others print "not run".
# Ran on one H200 with torch 2.11.0+cu130 (BENCHMARKS.md#gpu has what each step gave).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
export OUT_DIR
BIN=$(dirname "$PY")
export BIN
export PYTHONWARNINGS=ignore
declare -A RESULT

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" ${name%%-*} "* ]]; then
        return 0
    fi
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT_DIR/$name.log"
    if [ $rc -eq 0 ]; then RESULT[$name]=PASS; elif [ $rc -eq 77 ]; then RESULT[$name]=SKIP
    else RESULT[$name]="FAIL (rc $rc)"; fi
    echo "   ${RESULT[$name]} in $((SECONDS - start)) s"
}

step 1-device 45 "$PY" - <<'PYEOF'
import torch
from fairseq_hash import grouped_mm
assert torch.cuda.is_available(), "no CUDA device"
d = torch.device("cuda")
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(d),
      "capability", torch.cuda.get_device_capability(d))
print("grouped product fused for bf16:", grouped_mm.available("cuda", d.index, torch.bfloat16))
PYEOF

step 2-grouped-equals-loop 45 "$PY" - <<'PYEOF'
import torch
from fairseq_hash import experts as E, grouped_mm
torch.manual_seed(0)
counts = [512, 0, 300, 212]  # an idle expert: its gradient must be zero
ffn = E.ExpertFFN(4, 256, 1024).cuda().to(torch.bfloat16)
x = torch.randn(sum(counts), 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def run():
    for p in [x, *ffn.parameters()]:
        p.grad = None
    y = ffn(x, counts)
    y.float().square().sum().backward()
    return [y.float()] + [p.grad.float() for p in [x, *ffn.parameters()]]
fused = grouped_mm.available("cuda", x.device.index, torch.bfloat16)
grouped = run()
grouped_mm.usable, real = (lambda x, w: False), grouped_mm.usable
loop = run()
grouped_mm.usable = real
# bf16 rounds each product's output: compare each tensor's relative error as a whole
for name, a, b in zip(["y", "x.grad", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"],
                      grouped, loop):
    err = float((a - b).norm() / b.norm().clamp(min=1e-12))
    print(f"{name}: relative error {err:.2e}")
    assert err < 1e-2, name
assert ffn.fc1_weight.grad is not None
print("grouped (fused:", fused, ") equals the loop; idle expert grad max",
      float(grouped[2][1].abs().max()))
assert float(grouped[2][1].abs().max()) == 0
PYEOF

step 3-offload-equals-resident-cuda 150 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_offload_cuda.py

step 4-offload-speed-cuda 120 "$PY" benchmarks/gpu_offload_speed.py --experts 16 \
    --json "$OUT_DIR/offload-cuda.json"

step 5-no-host-syncs 90 "$PY" - <<'PYEOF'
import os, sys, tempfile, traceback, warnings
import torch
sys.path.insert(0, "tests")
from conftest import preprocess, user_dir, write_corpus
from models_util import build_in_process
tmp = tempfile.mkdtemp()
data = preprocess(write_corpus(os.path.join(tmp, "raw")), os.path.join(tmp, "data-bin"))
model, task = build_in_process([data, "--task", "language_modeling", "--arch",
    "hash_transformer_lm", "--user-dir", user_dir(), "--decoder-layers", "2",
    "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "256",
    "--decoder-attention-heads", "2", "--hash-layer", "0,1", "--hash-experts", "8",
    "--tokens-per-sample", "64"])
model = model.cuda().to(torch.bfloat16).train()
tokens = torch.randint(4, len(task.dictionary), (4, 64), device="cuda")
tokens[1, 50:] = task.dictionary.pad()
def step():
    out, _ = model(tokens)
    out.float().sum().backward()
step()  # warm-up: the grouped product's probe and the pinned memory pool
torch.cuda.synchronize()
# every synchronisation warning, with the Python stack that made it; a frame in
# fairseq_hash/ outside models/ (the decoders' glue, which runs fairseq's own layers)
# counts as inside a hash layer, except the dispatch plan's one read a forward pass
PACKAGE, GLUE = os.path.join("fairseq_hash", ""), os.path.join("fairseq_hash", "models", "")
seen = []
def record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" in str(message):
        seen.append(traceback.extract_stack()[:-1])
warnings.showwarning = record
warnings.simplefilter("always")
torch.cuda.set_sync_debug_mode("warn")
step()
torch.cuda.set_sync_debug_mode(0)
planned = [s for s in seen if any(f.name == "plan_hash_dispatch" for f in s)]
def innermost(stack):  # the innermost frame outside torch and the warnings module
    frames = [f for f in stack if os.path.join("site-packages", "torch", "") not in f.filename
              and not f.filename.endswith("warnings.py")]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
inside = [innermost(s) for s in seen if s not in planned
          and any(PACKAGE in f.filename and GLUE not in f.filename for f in s)]
outside = [innermost(s) for s in seen if s not in planned and innermost(s) not in inside]
print("syncs of the dispatch plan (one a forward pass expected):", len(planned),
      [innermost(s) for s in planned])
print("syncs inside hash layers:", inside)
print("syncs elsewhere in the step (fairseq's own):", outside)
assert not inside, "a hash layer synchronised with the host"
assert len(planned) == 1, "the dispatch plan waited more than once"
PYEOF

step 6-layer-bench-bf16 90 "$BIN/fairseq-hash-bench" --device cuda --dtype bfloat16 \
    --experts 16 64 --tokens 8192 --repeat 20 --json "$OUT_DIR/layer-bf16.json"

train() {  # train SAVE_DIR MAX_UPDATE
    "$BIN/fairseq-train" "$OUT_DIR/data/data-bin" --task language_modeling \
        --user-dir "$("$BIN/fairseq-hash-user-dir")" --arch hash_transformer_lm --hash-layer 0,-1 --hash-experts 16 \
        --decoder-layers 4 --decoder-embed-dim 256 --decoder-ffn-embed-dim 1024 \
        --decoder-attention-heads 4 --tokens-per-sample 256 --max-tokens 8192 $PRECISION \
        --optimizer adam --lr 0.0005 --max-update "$2" --save-interval-updates 40 \
        --log-format json --log-interval 10 --save-dir "$1" --disable-validation \
        --num-workers 0
}
train_and_resume() {
    "$BIN/fairseq-hash-prepare" --output-dir "$OUT_DIR/data" || return 1
    train "$OUT_DIR/ckpt" 40 || return 1
    ls -l "$OUT_DIR/ckpt"
    train "$OUT_DIR/ckpt" 80 2>&1 | tee "$OUT_DIR/resume.out" || return 1
    grep -qi "loaded checkpoint.*40 updates" "$OUT_DIR/resume.out" \
        || { echo "the second run did not resume from update 40"; return 1; }
}
export -f train train_and_resume
export PRECISION="--fp16 --fp16-no-flatten-grads"
step 7-train-save-resume-fp16 120 bash -c train_and_resume
# fairseq's --bf16 "implies --tpu" (options.py); whether its Trainer then runs on a GPU
bf16_train() { PRECISION=--bf16 train "$OUT_DIR/ckpt-bf16" 5; }
export -f bf16_train
step 7b-fairseq-bf16-flag 40 bash -c bf16_train

step 8-nccl-two-ranks-one-gpu 45 "$PY" - <<'PYEOF'
# two ranks on one GPU through NCCL: the exchange and its backward against one process
import os, socket, subprocess, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
worker = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, "tests")
rank = int(sys.argv[1])
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:%s", rank=rank, world_size=2)
from fairseq.data import Dictionary
from ep_worker import layer_spec, tokens_of
from fairseq_hash.hashing import RouteInputs
from fairseq_hash.moe_factory import build_hash_moe
d = Dictionary()
for i in range(30): d.add_symbol(f"w{i}")
torch.manual_seed(0)
moe = build_hash_moe(layer_spec("hash", "alltoall", 0), d, 0, 8, 16).cuda().eval()
x, tokens = tokens_of(rank)
x = x.cuda().requires_grad_()
y = moe(x.unsqueeze(1), RouteInputs.from_tokens(tokens.cuda(), d.pad(), d.eos())).squeeze(1)
(y * torch.arange(1.0, 9.0, device="cuda")).sum().backward()
torch.save({"y": y.cpu(), "x_grad": x.grad.cpu()}, "%s.%%d.pt" %% rank)
dist.destroy_process_group()
''' % (port, os.path.join(os.environ.get("OUT_DIR", "."), "nccl"))
procs = [subprocess.Popen([sys.executable, "-c", worker, str(r)], stderr=subprocess.PIPE,
                          text=True) for r in range(2)]
errs = [p.communicate(timeout=50)[1] for p in procs]
if any(p.returncode for p in procs):
    text = "\n".join(errs)
    print(text[-3000:])
    if "Duplicate GPU" in text or "same device" in text:
        print("NCCL refuses two ranks on one GPU: not possible on this machine")
        sys.exit(77)
    sys.exit(1)
print("2 NCCL ranks on one GPU ran forward and backward")
PYEOF

echo "== summary"
for name in 1-device 2-grouped-equals-loop 3-offload-equals-resident-cuda \
            4-offload-speed-cuda 5-no-host-syncs 6-layer-bench-bf16 7-train-save-resume-fp16 \
            7b-fairseq-bf16-flag 8-nccl-two-ranks-one-gpu; do
    printf '%-30s %s\n' "$name" "${RESULT[$name]:-not run}"
done | tee "$OUT_DIR/summary.txt"

#!/usr/bin/env bash
# On the GPU machine, in the checkout: installs what benchmarks/gpu_env/pack.sh put in .gpu/
# (fairseq-fixed with extensions built for Python 3.12, hydra, omegaconf, antlr4, fairscale,
# bitarray) into the Python that holds torch (PY, default python3), and this checkout.
set -euo pipefail
PY=${PY:-python3}
SP=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
EXE=$($PY -c "import sys; print(sys.executable)")
BIN=$(dirname "$EXE")
$PY -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check .gpu/*.whl
tar xzf .gpu/site.tgz -C "$SP"
tar xzf .gpu/fairseq.tgz -C "$SP"
# this checkout on the path, and fairseq's and this project's tools as scripts (the
# image's setuptools builds an editable install in an isolated environment: offline, none)
echo "$PWD" > "$SP/fairseq_hash_checkout.pth"
$PY - "$BIN" "$EXE" <<'PYEOF'
import os, runpy, sys
bin_dir, exe = sys.argv[1:]
tools = {f"fairseq-{name.replace('_', '-')}": f"fairseq_cli.{name}:cli_main" for name in
         ("eval_lm", "generate", "interactive", "preprocess", "train", "validate", "score")}
tools.update({name: f"{module}:main" for name, module in
              runpy.run_path("fairseq_hash/cli/tools.py")["TOOLS"].items()})
for name, target in tools.items():
    module, func = target.split(":")
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f"#!{exe}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    os.chmod(path, 0o755)
PYEOF
$PY -c "import torch, numpy, fairseq, fairseq_hash, fairscale; print('torch', torch.__version__, 'numpy', numpy.__version__, 'fairseq', fairseq.__version__, 'cuda', torch.cuda.is_available())"
echo "BIN=$BIN"

#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.sh needs for a GPU machine that has Python 3.12 and a CUDA
# build of torch but no network (as the H200 that ran it, BENCHMARKS.md#gpu) into .gpu/:
#
#     PY312=/path/to/python3.12 bash benchmarks/gpu_env/pack.sh    # here, with the network
#     bash benchmarks/gpu_env/install_offline.sh                     # there, in the checkout
#
# fairseq-fixed 0.12.3.1 from its source package, its three extensions that need no torch
# (libbleu, data_utils_fast, token_block_utils_fast) built for that Python against NumPy 2,
# with the three lines NumPy 2 removed patched (np.compat.long -> np.int64, np.int -> int);
# hydra-core, omegaconf, antlr4 and fairscale (pure Python) from .venv; bitarray's wheel.
# .gpu/ is for .git/info/exclude, and the device tool's carry.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY312=${PY312:-python3.12}
WORK=$(mktemp -d)
mkdir -p "$ROOT/.gpu"
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "numpy>=2,<3" cython setuptools
"$ROOT/.venv/bin/python" -m pip download -q --no-deps --no-build-isolation --no-binary :all: \
    fairseq-fixed==0.12.3.1 -d "$WORK"
tar xzf "$WORK"/fairseq_fixed-0.12.3.1.tar.gz -C "$WORK"
SRC="$WORK/fairseq_fixed-0.12.3.1"
sed -i 's/np\.compat\.long/np.int64/g' "$SRC/fairseq/data/token_block_dataset.py" \
    "$SRC/fairseq/data/language_pair_dataset.py"
sed -i 's/^\(\s*\)np\.int,/\1int,/' "$SRC/fairseq/data/data_utils.py"
(cd "$SRC" && "$WORK/venv/bin/python" - <<'PYEOF'
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
args = ["-std=c++11", "-O3"]
exts = [Extension("fairseq.libbleu", ["fairseq/clib/libbleu/libbleu.cpp",
                                      "fairseq/clib/libbleu/module.cpp"], extra_compile_args=args)]
exts += [Extension(f"fairseq.data.{name}", [f"fairseq/data/{name}.pyx"], language="c++",
                   include_dirs=[numpy.get_include()], extra_compile_args=args)
         for name in ("data_utils_fast", "token_block_utils_fast")]
setup(name="fairseq-extensions", ext_modules=cythonize(exts, language_level=3),
      script_args=["build_ext", "--inplace", "-q"])
PYEOF
)
tar czf "$ROOT/.gpu/fairseq.tgz" --exclude=__pycache__ -C "$SRC" fairseq fairseq_cli
SP=$("$ROOT/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
(cd "$SP" && tar czf "$ROOT/.gpu/site.tgz" --exclude=__pycache__ antlr4 antlr4_python3_runtime-*.dist-info \
    fairscale fairscale-*.dist-info hydra hydra_core-*.dist-info omegaconf omegaconf-*.dist-info)
"$WORK/venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$ROOT/.gpu" bitarray==3.12.3
rm -rf "$WORK"
ls -l "$ROOT/.gpu"

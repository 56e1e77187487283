import os
import runpy

from setuptools import find_packages, setup

TOOLS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "fairseq_hash", "cli", "tools.py"))["TOOLS"]

setup(
    name="fairseq-hash",
    version="0.1.0",
    description="Hash Layers (Roller et al., 2021) for fairseq Transformers",
    packages=find_packages(include=["fairseq_hash", "fairseq_hash.*"]),
    # fairseq-hydra-train configs
    package_data={"fairseq_hash": ["config/*.yaml"]},
    python_requires=">=3.10",
    # ranges, not pins: installed into an existing fairseq environment, the
    # plugin keeps its torch. run/setup.sh installs the exact versions of
    # run/constraints.txt. fairseq itself is not required here: a fairseq
    # installed from source (distribution "fairseq") and fairseq-fixed both
    # provide the module; fairseq_hash checks on import that one works.
    install_requires=[
        "torch>=2.4",  # tested with 2.13.0 only (run/constraints.txt)
        "numpy<2",  # fairseq's data code calls np.compat.long
        "fairscale>=0.4.13,<0.5",
        "sentencepiece",
        "matplotlib",
    ],
    extras_require={
        # fairseq's main branch, importable on Python 3.11 (fairseq 0.12.2 is not)
        "fairseq": ["fairseq-fixed>=0.12.3.1"],
    },
    # the console scripts, from the one table that fairseq_runner also reads
    entry_points={"console_scripts": [f"{name}={module}:main" for name, module in TOOLS.items()]},
)

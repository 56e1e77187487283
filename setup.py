from setuptools import find_packages, setup

setup(
    name="fairseq-hash",
    version="0.1.0",
    description="Hash Layers (Roller et al., 2021) for fairseq Transformers",
    packages=find_packages(include=["fairseq_hash", "fairseq_hash.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "fairseq-fixed==0.12.3.1",
        "numpy<2",
        "fairscale==0.4.13",
        "sentencepiece",
        "matplotlib",
    ],
    entry_points={
        "console_scripts": [
            "fairseq-hash-user-dir=fairseq_hash.cli.user_dir:main",
            "fairseq-hash-prepare=fairseq_hash.cli.prepare:main",
            "fairseq-hash-demo=fairseq_hash.cli.demo:main",
            "fairseq-hash-help=fairseq_hash.cli.flags:main",
            "fairseq-hash-compare=fairseq_hash.cli.compare:main",
            "fairseq-hash-table=fairseq_hash.cli.hash_table:main",
            "fairseq-hash-report=fairseq_hash.cli.report:main",
            "fairseq-hash-study=fairseq_hash.cli.hash_study:main",
            "fairseq-hash-bench=fairseq_hash.cli.bench:main",
            "fairseq-hash-upcycle=fairseq_hash.cli.upcycle:main",
        ],
    },
)

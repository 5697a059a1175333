"""Distribution `gradcodec`.

The repository's top-level `kernels/` and `integrations/` folders install as `gradcodec.kernels` and
`gradcodec.integrations`: a top-level module named `kernels` would shadow the unrelated PyPI package
of that name, which transformers probes for.
"""
from setuptools import find_packages, setup

PACKAGE_DIRS = {"gradcodec": "gradcodec", "gradcodec.kernels": "kernels", "gradcodec.integrations": "integrations"}


def _packages() -> list[str]:
    found = []
    for package, folder in PACKAGE_DIRS.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    name="gradcodec",
    version="0.1.0",
    description="Gradient and LoRA-update compression for federated fine-tuning of LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_DIRS,
    package_data={"gradcodec.integrations.fedlora": ["*.json", "*.toml"]},
    install_requires=[
        "torch==2.13.0",
        "triton",
        "numpy",
        "zstandard",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "pytest-timeout", "constriction", "dp-accounting"],
        "dp": ["dp-accounting"],
        "entropy": ["constriction"],
        "peers": ["bitsandbytes"],
        "fl": ["transformers", "peft", "flwr[simulation]>=1.42", "tokenizers", "safetensors", "matplotlib"],
        "nvflare": ["nvflare>=2.9"],
    },
    entry_points={"console_scripts": ["gradcodec = gradcodec.cli:main"]},
)

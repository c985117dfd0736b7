"""The core install (op, store and fact readers) needs no Hugging Face package; the Editor and the
integration without them fail with one ImportError that names the install command."""

import os
import pathlib
import subprocess
import sys
import textwrap
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF_PACKAGES = {"transformers", "gguf", "accelerate", "tqdm"}


def requirement_names(requirements) -> set[str]:
    return {requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
            for requirement in requirements}


def test_hugging_face_packages_are_in_the_hf_extra_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not requirement_names(project["dependencies"]) & HF_PACKAGES
    assert requirement_names(project["optional-dependencies"]["hf"]) == HF_PACKAGES


# Run with transformers and tqdm blocked (sys.modules[name] = None makes importing them fail), as
# in a core-only install.
CORE_ONLY = textwrap.dedent("""
    import sys
    for name in ("transformers", "tqdm"):
        sys.modules[name] = None
    import torch
    import neuraldb_kernels as nk

    g = torch.Generator().manual_seed(0)
    q, K, R = torch.randn(4, 32, generator=g), torch.randn(20, 32, generator=g), torch.randn(20, 8, generator=g)
    K[5] = 3.0 * q[2]
    out, index, score = nk.gated_retrieve(q, K, R, gamma=0.9, return_index=True)
    cosine = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(K.double(), dim=1).T
    assert index.tolist() == [5 if row == 2 else -1 for row in range(4)], (index, cosine.max(1))
    assert torch.equal(out[2], R[5]) and not out[[0, 1, 3]].any()
    db = nk.NeuralDB(d1=32, d2=8, layer=0)
    db.add(K[:3], R[:3], ids=["a", "b", "c"])
    assert [hit.id for hit in db.search(K[1], k=1)] == ["b"]
    from neuraldb_kernels.editing import FORMATS, read_facts  # reading fact files needs no model
    assert "jsonl" in FORMATS and callable(read_facts)
    for statement in ("from neuraldb_kernels.editing import Editor", "import neuraldb_kernels.integration"):
        try:
            exec(statement)
        except ImportError as error:
            print(error)
        else:
            raise SystemExit(statement + " ran without transformers")
""")


def test_core_works_without_hugging_face_packages_and_the_rest_says_how_to_install_them():
    result = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    messages = result.stdout.strip().splitlines()
    assert len(messages) == 2
    for package, message in zip(("neuraldb_kernels.editing", "neuraldb_kernels.integration"), messages):
        assert message.startswith(package) and "transformers, tqdm are not installed" in message
        assert 'pip install --no-build-isolation -e ".[hf]"' in message

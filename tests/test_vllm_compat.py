"""tools/vllm_compat.py, the runner of vLLM's own OpenAI-server tests against our server: its flag
translation and staging. (The run itself needs a vLLM source tree and takes minutes;
README "vLLM compatibility" has the command and the results.)"""

import pytest

pytest.importorskip("requests")
pytest.importorskip("openai")

from tools import vllm_compat  # noqa: E402
from tools.vllm_compat_plugin import _RUNNING, _Internal, translate_args  # noqa: E402


def test_flags_kept_dropped_or_refused_by_name():
    args = ["--dtype", "bfloat16", "--max-model-len=1024", "--enforce-eager", "--max-num-seqs",
            "32", "--enable-lora", "--lora-modules", "a=b", "--max-logprobs", "-1",
            "--return-tokens-as-token-ids", "--gpu-memory-utilization", "0.7",
            "--trust-remote-code"]
    assert translate_args(args) == ["--max-model-len", "1024", "--max-num-seqs", "32",
                                    "--max-logprobs", "-1", "--return-tokens-as-token-ids",
                                    "--trust-remote-code"]
    with pytest.raises(ValueError, match="--speculative-model"):
        translate_args(["--speculative-model", "x"])


def test_a_vllm_internal_skips_the_test_that_uses_it():
    internal = _Internal("vllm.sampling_params.SamplingParams")
    # called while a module is imported (a module-level constant): a placeholder, no skip
    assert isinstance(internal(n=2), _Internal)
    _RUNNING[0] = True  # inside a test, as the plugin's runtest hook marks it
    try:
        for use in (lambda: internal(n=2), lambda: internal == 1, lambda: internal.x + 1,
                    lambda: internal[0]):
            with pytest.raises(pytest.skip.Exception, match="vllm.sampling_params"):
                use()

        class Sub(internal):  # a test's subclass of a vLLM class skips when it is made
            pass

        with pytest.raises(pytest.skip.Exception, match="vllm.sampling_params"):
            Sub()
    finally:
        _RUNNING[0] = False


def test_stage_copies_the_listed_files_as_packages(tmp_path):
    vllm = tmp_path / "vllm"
    listed = vllm / vllm_compat.TEST_FILES[0]
    listed.parent.mkdir(parents=True)
    listed.write_text("def test_x():\n    pass\n")
    (vllm / vllm_compat.CONFTEST).write_text("import pytest\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert vllm_compat.stage(vllm, scratch) == [vllm_compat.TEST_FILES[0]]
    assert (scratch / vllm_compat.TEST_FILES[0]).read_text() == listed.read_text()
    assert (scratch / "tests" / "__init__.py").exists()
    assert (scratch / vllm_compat.CONFTEST).exists()


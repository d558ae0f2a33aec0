"""The lm-evaluation-harness adapter: its three request types on the rigged model (with plain request objects,
and with lm-eval's own ``Instance`` and registry when lm-eval is installed), and importing it without lm-eval."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_evals_rig import AsciiTokenizer, base_table, logprob, rigged_model, text_logprob

from gearshift.evals import EvalError
from gearshift.evals.lm_eval_adapter import GearshiftLM
from gearshift.placement import PlacementError


class Request:
    """What the adapter reads from lm-eval's ``Instance``: an ``args`` tuple."""

    def __init__(self, *args: object) -> None:
        self.args = args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = rigged_model()
    model.add_preset("fast", "GK")
    path = tmp_path_factory.mktemp("lm") / "ckpt"
    model.save_pretrained(path)
    return path


def check_answers(lm, make) -> None:
    table = base_table()
    lls = lm.loglikelihood([make("loglikelihood", ("q:", " abc")), make("loglikelihood", ("x?", " b"))])
    assert lls[0][0] == pytest.approx(text_logprob(table, "q:", " abc"), abs=1e-4) and lls[0][1] is True
    assert lls[1][0] == pytest.approx(text_logprob(table, "x?", " b"), abs=1e-4) and lls[1][1] is False
    (rolling,) = lm.loglikelihood_rolling([make("loglikelihood_rolling", ("abc",))])
    assert rolling == pytest.approx(logprob(table, "\x00", "a") + text_logprob(table, "a", "bc"), abs=1e-4)
    gens = lm.generate_until(
        [
            make("generate_until", ("q:", {"until": ["d"], "max_gen_toks": 10, "do_sample": False})),
            make("generate_until", ("long prompt?", {"until": "c"})),
            make("generate_until", ("q:", {"max_gen_toks": 2})),
        ]
    )
    assert gens == [" abc", " ab", " a"]


def test_adapter_with_plain_requests():
    lm = GearshiftLM(model=rigged_model(), tokenizer=AsciiTokenizer(), preset="GK")
    assert lm.placement == ("gdn", "kda") and lm.max_length == 512
    check_answers(lm, lambda kind, args: Request(*args))
    check_answers(lm, lambda kind, args: args)  # bare tuples work too


def test_adapter_loads_a_checkpoint(checkpoint):
    lm = GearshiftLM(pretrained=str(checkpoint), preset="fast", tokenizer="bytes", batch_size="auto", device="cpu")
    assert lm.placement == ("gdn", "kda") and lm.scorer.max_batch_size == 64
    with pytest.raises(PlacementError, match="nope"):
        GearshiftLM(pretrained=str(checkpoint), preset="nope", tokenizer="bytes", device="cpu")
    with pytest.raises(EvalError, match="holds no tokenizer"):
        GearshiftLM(pretrained=str(checkpoint), preset="fast", device="cpu")
    with pytest.raises(EvalError, match="pretrained"):
        GearshiftLM(preset="fast")


def test_importable_without_lm_eval():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"  # makes `import lm_eval` fail, as when not installed
        "import gearshift.evals.lm_eval_adapter as a\n"
        "assert a._register is None and a.GearshiftLM.__mro__[1] is object\n"
        "try:\n    a.main([])\nexcept SystemExit as e:\n    assert 'pip install lm-eval' in str(e)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_registered_with_lm_eval(checkpoint):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    assert get_model("gearshift") is GearshiftLM and issubclass(GearshiftLM, LM)
    lm = get_model("gearshift").create_from_arg_string(
        f"pretrained={checkpoint},preset=fast,tokenizer=bytes", {"batch_size": 8, "device": "cpu"}
    )
    assert lm.scorer.max_batch_size == 8
    check_answers(lm, lambda kind, args: Instance(kind, doc={}, arguments=args, idx=0))

"""The curation stages close the models they build (a vLLM engine's core process stops then, not in
the interpreter's clean-up at exit) before the next is built, also when the stage fails; a model
handed over already built stays open for its owner; a stage with nothing left to do builds none."""

import pytest

from carevl.backends.interface import Sampling
from carevl.curation import critiques, labels, stages
from carevl.standins.simulated import (
    SimulatedAnswerer,
    SimulatedCaptioner,
    SimulatedEvaluator,
    SimulatedExpert,
    SimulatedJudge,
)
from tests.helpers import ingest_world, split_world


def lifetimes(events: list, base: type):
    """A subclass of `base` that appends ("build", name) and ("close", name) to `events`."""

    class Logged(base):
        def __init__(self, name, *args, **kwargs):
            super().__init__(name, *args, **kwargs)
            events.append(("build", name))

        def close(self):
            events.append(("close", self.name))

    return Logged


def test_each_built_model_is_closed_before_the_next_is_built_and_a_handed_over_one_is_left_open(tmp_path):
    workdir, events = str(tmp_path), []
    ingest_world(workdir, 8, seed=0)
    answerer = lifetimes(events, SimulatedAnswerer)
    handed = answerer("handed", workdir)
    models = {"a": lambda: answerer("a", workdir), "handed": handed, "b": lambda: answerer("b", workdir)}
    decodings = {"greedy": Sampling(), "t1": Sampling(temperature=1.0)}
    stages.candidates(workdir, models, decodings)
    assert events == [("build", "handed"), ("build", "a"), ("close", "a"), ("build", "b"), ("close", "b")]

    del events[:]
    stages.candidates(workdir, models, decodings)
    assert events == [], "all done: nothing built"

    expert = lifetimes(events, SimulatedExpert)
    stages.captions(workdir, lambda: lifetimes(events, SimulatedCaptioner)("captioner", workdir))
    stages.pairs(workdir)
    labels.votes(workdir, {"e1": lambda: expert("e1"), "e2": lambda: expert("e2")})
    assert events == [
        ("build", "captioner"),
        ("close", "captioner"),
        ("build", "e1"),
        ("close", "e1"),
        ("build", "e2"),
        ("close", "e2"),
    ]


def test_a_model_is_closed_when_its_stage_fails(tmp_path):
    workdir, events = str(tmp_path), []
    ingest_world(workdir, 4, seed=0)

    class Broken(lifetimes(events, SimulatedCaptioner)):
        def generate(self, chats, sampling, schema=None):
            raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        stages.captions(workdir, lambda: Broken("captioner", workdir))
    assert events == [("build", "captioner"), ("close", "captioner")]

    del events[:]
    with pytest.raises(RuntimeError, match="engine died"):
        stages.candidates(workdir, {"m": lambda: Broken("m", workdir)}, {"greedy": Sampling()})
    assert events == [("build", "m"), ("close", "m")]


def test_critique_sampling_and_evaluation_close_the_models_they_built(tmp_path):
    workdir, events = str(tmp_path), []
    split_world(workdir, 30, seed=8)
    assert critiques.low_confidence(workdir), "there are pairs to critique"
    judge, evaluator = lifetimes(events, SimulatedJudge), lifetimes(events, SimulatedEvaluator)
    critiques.critiques(workdir, lambda: judge("sft", workdir, accuracy=0.6), name="sft", samples=2)
    critiques.evaluate(workdir, lambda: evaluator("eval", unparseable_rate=0.0), name="eval")
    assert events == [("build", "sft"), ("close", "sft"), ("build", "eval"), ("close", "eval")]

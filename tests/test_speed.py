from dataclasses import fields

from hypothesis import given
from hypothesis import strategies as st

from qloraner.config import TrainConfig
from qloraner.memory import Checkpointing
from qloraner.speed import Speed

speeds = st.builds(
    Speed,
    compile=st.booleans(),
    checkpointing=st.builds(Checkpointing, st.booleans(), st.sampled_from(["set", "auto: fits 1.0 of 2.0 GiB"])),
    cuda_graphs=st.booleans(),
    frozen_copies=st.booleans(),
    nf4_in_graph=st.booleans(),
    recompute_in_graph=st.booleans(),
)


@given(speeds)
def test_the_record_keeps_each_switch_under_its_settings_name(speed):
    """Speed.record() keeps every switch under the name of the setting that asks for it (a TrainConfig field: the
    adapter's train_config.json then reads as settings, what ran in place of auto), with the value that ran, and
    checkpointing's choice beside its reason."""
    record = speed.record()
    names = {f.name for f in fields(TrainConfig)}
    switches = {k: v for k, v in record.items() if not k.startswith("gradient_checkpointing_")}
    assert set(switches) <= names and all(isinstance(v, bool) for v in switches.values())
    assert [switches["compile"], switches["cuda_graphs"], switches["frozen_copies"]] == [
        speed.compile,
        speed.cuda_graphs,
        speed.frozen_copies,
    ]
    assert switches["dequantize_in_graph"] == speed.nf4_in_graph
    assert (record["gradient_checkpointing_used"], record["gradient_checkpointing_source"]) == (
        speed.checkpointing.on,
        speed.checkpointing.source,
    )


@given(speeds)
def test_the_plan_line_says_each_choice(speed):
    """describe() says compile on or off, checkpointing on or off with its reason, and the frozen weights' form;
    hashed dropout is wanted exactly where checkpointing recomputes inside the compiled layers under CUDA graphs."""
    line = speed.describe()
    assert line.startswith(f"compile {'on' if speed.compile else 'off'}, ")
    assert speed.checkpointing.describe() in line
    assert ("dequantized once" in line) == speed.frozen_copies
    assert ("dequantized in the compiled layers" in line) == speed.nf4_in_graph
    assert speed.counter_dropout == (speed.recompute_in_graph and speed.cuda_graphs)

"""The HLO liveness walk (ttt_jax.bench.hlo_memory) on a module compiled here, on the CPU."""

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.bench.hlo_memory import analyse, format_report, main, shape_bytes

pytestmark = pytest.mark.structure


def test_shape_bytes():
    assert shape_bytes("f32[4,8]{1,0}") == 128
    assert shape_bytes("(bf16[2,3], s8[5], pred[])") == 12 + 5 + 1
    assert shape_bytes("f32[]") == 4


def _two_chains(x):
    # Two large intermediates, the first kept alive until the end by the final sum: both are live
    # at the peak. The small tail reductions are not.
    a = jnp.sin(x) @ x               # [512, 512] f32, 1 MiB
    b = jnp.cos(a) @ x               # [512, 512] f32, needs a
    return jnp.sum(b) + jnp.sum(a * 2.0)


def test_walk_finds_the_live_intermediates(tmp_path):
    x = jnp.ones((512, 512), jnp.float32)
    text = jax.jit(_two_chains).lower(x).compile().as_text()
    report = analyse(text)
    mib = 2 ** 20
    assert report.n_instructions > 2
    assert report.peak_bytes >= 2 * mib             # at least a and b (or their fusions) at once
    assert report.live and report.live[0].bytes >= mib
    assert [v.bytes for v in report.live] == sorted((v.bytes for v in report.live), reverse=True)
    assert sum(b for _, b in report.by_op_name) == sum(v.bytes for v in report.live)
    assert sum(b for _, b in report.by_last_user) == sum(v.bytes for v in report.live)
    # Every value's last user is the instruction at its death.
    lines = [ln for ln in text[text.find("\nENTRY "):].split("\n")[1:] if " = " in ln]
    for v in report.live:
        if v.dies > v.born:
            user = lines[v.dies]
            assert v.last_user and (v.last_user in user or v.last_user.strip("<>") in user), (v, user)
    assert "what keeps them live" in format_report(report)
    assert "peak of live values" in format_report(report)
    path = tmp_path / "m.txt"
    path.write_text(text)
    main([str(path), "--top", "3"])


def test_rejects_text_without_entry():
    with pytest.raises(ValueError, match="ENTRY"):
        analyse("HloModule m\n")


def test_cli_names_a_missing_or_wrong_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "absent.txt")])
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("HloModule m\n")
    with pytest.raises(SystemExit):
        main([str(bad)])
    assert "no ENTRY computation" in capsys.readouterr().err

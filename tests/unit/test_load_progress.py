from kiln.models.loader import load_model


def test_loading_shows_a_progress_bar_over_every_tensor(tiny_gqa_dir, capsys):
    load_model(tiny_gqa_dir, progress=True)
    out = capsys.readouterr().out
    # 2 layers x 6 packed tensors (qkv, o, gate_up, down, 2 norms) + embeddings, final norm, untied head.
    assert "loading weights (cpu)" in out and "15/15" in out
    load_model(tiny_gqa_dir)
    assert capsys.readouterr().out == ""

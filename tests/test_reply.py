from mlx_glm4v.generation.reply import ReplySplitter, split_reply

GLM41V = (
    "<think>Look at the cat.</think><answer>A cat "
    "<|begin_of_box|>[[10,20,30,40]]<|end_of_box|></answer>"
)


def test_split_whole_reply():
    parts = split_reply(GLM41V)
    assert parts.reasoning == "Look at the cat."
    assert parts.answer == "A cat [[10,20,30,40]]"
    assert split_reply("<think>still thinking").answer == ""
    assert split_reply("plain a < b").answer == "plain a < b"


def test_streamed_split_equals_whole_at_every_cut():
    for size in range(1, 12):
        splitter = ReplySplitter()
        pieces = [splitter.feed(GLM41V[i : i + size]) for i in range(0, len(GLM41V), size)] + [
            splitter.finish()
        ]
        assert "".join(p[0] for p in pieces).strip() == split_reply(GLM41V).reasoning
        assert "".join(p[1] for p in pieces).strip() == split_reply(GLM41V).answer

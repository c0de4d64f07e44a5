"""Fine-tuning data (tuning/data.py): records -> ids, labels and pixels, batches, bad records.

The labelled tokens are derived here from the rendered text and the tokenizer, not from token ids:
each assistant turn's text after its `<|assistant|>` through the next role marker the template
wrote (role strings inside message text are data, not turns), tokenized on its own.
"""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import (
    as_row,
    data_url,
    picture,
    png_bytes,
    write_parquet,
    write_saved,
    write_scrolling_video,
)

from mlx_glm4v.checkpoints.loader import load_model
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.inputs.processor import DATA_OPEN, Processor
from mlx_glm4v.models.loss import IGNORE_INDEX
from mlx_glm4v.models.rope_index import token_types
from mlx_glm4v.tuning.data import ConversationData, collate, encode, parse_record, read_jsonl
from mlx_glm4v.tuning.finetune import read_data
from mlx_glm4v.tuning.hf_dataset import dataset_splits

# a role marker the template wrote (one inside message text is marked as data)
ROLE = re.compile(r"(?<!" + DATA_OPEN + r")<\|(system|user|assistant|observation)\|>")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def conversation(tmp_path):
    """A multi-turn record: an image by path, a tool call and its result, an image by data URL, a
    role token written as text; and the same conversation as the template takes it."""
    picture(56, 84, 1).save(tmp_path / "street.png")
    second = picture(84, 56, 2)
    second.save(tmp_path / "second.png")
    record = {
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "street.png"}},
                    {"type": "text", "text": "Weather here? Not a turn: <|assistant|>"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 20 C"},
            {"role": "assistant", "content": "It is sunny in Paris."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And this one?"},
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes(second))}},
                ],
            },
            {"role": "assistant", "content": "A cat sits on a red sofa."},
        ],
    }
    template = json.loads(json.dumps(record["messages"]))
    template[1]["content"][0] = {"type": "image", "image": str(tmp_path / "street.png")}
    template[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    template[2]["content"] = ""
    template[5]["content"][1] = {"type": "image", "image": str(tmp_path / "second.png")}
    return record, template


def labelled_runs(labels) -> list:
    """The labelled stretches of a row, as lists of ids."""
    runs, current = [], []
    for token in labels.tolist() + [IGNORE_INDEX]:
        if token != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs


def expected_runs(processor, messages, tools=None) -> list:
    text = processor.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
    text += "<|user|>"
    marks = list(ROLE.finditer(text))
    return [
        processor.tokenizer.encode(text[m.end() : following.end()])
        for m, following in zip(marks, marks[1:])
        if m.group(1) == "assistant"
    ]


@pytest.fixture(scope="module")
def moe(glm4v_moe_checkpoint):
    return Processor.from_pretrained(glm4v_moe_checkpoint[0])


def test_labels_of_a_conversation_with_tools_and_images(moe, tmp_path):
    record, template = conversation(tmp_path)
    example = encode(moe, parse_record(record, "data.jsonl line 1", tmp_path))
    ids, labels = example.input_ids, example.labels
    labelled = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[labelled], ids[labelled])
    runs = labelled_runs(labels)
    assert runs == expected_runs(moe, template, TOOLS)
    assert len(runs) == 3  # the assistant's three turns, not the role string in the user's text
    ends = [moe.convert_tokens_to_ids(t) for t in ("<|observation|>", "<|user|>", "<|user|>")]
    assert [run[-1] for run in runs] == ends
    tool_call = moe.tokenizer.decode(runs[0])
    assert "<tool_call>get_weather" in tool_call and "Paris" in tool_call
    assert "sunny, 20 C" not in moe.tokenizer.decode(ids[labelled])  # the tool's result is input
    # the prompt before the last reply is the inference prompt, pixels included
    prompt = moe.process_messages(template[:-1], template_kwargs={"tools": TOOLS})
    n = prompt["input_ids"].shape[1]
    np.testing.assert_array_equal(ids[:n], prompt["input_ids"][0])
    last = np.flatnonzero(ids[:n] == moe.convert_tokens_to_ids("<|assistant|>"))[-1]
    assert labels[last] == IGNORE_INDEX and (labels[last + 1 :] != IGNORE_INDEX).all()
    for key in ("pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(example.media[key], prompt[key])


def test_train_on_prompt_labels_everything(moe, tmp_path):
    record, _ = conversation(tmp_path)
    example = encode(moe, parse_record(record, "x", tmp_path), train_on_prompt=True)
    np.testing.assert_array_equal(example.labels, example.input_ids)


def test_glm41v_template_with_an_image_and_a_video(glm4v_checkpoint, tmp_path):
    processor = Processor.from_pretrained(glm4v_checkpoint[0])
    picture(56, 56, 3).save(tmp_path / "a.png")
    write_scrolling_video(tmp_path / "v.mp4")
    record = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": "What is it?"},
                ],
            },
            {"role": "assistant", "content": "<think>hm</think><answer>A picture.</answer>"},
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": "v.mp4"}},
                    {"type": "text", "text": "And this?"},
                ],
            },
            {"role": "assistant", "content": "A scrolling picture."},
        ]
    }
    template = json.loads(json.dumps(record["messages"]))
    template[0]["content"][0]["image"] = str(tmp_path / "a.png")
    template[2]["content"][0] = {"type": "video", "video": str(tmp_path / "v.mp4")}
    example = encode(processor, parse_record(record, "x", tmp_path))
    runs = labelled_runs(example.labels)
    assert runs == expected_runs(processor, template) and len(runs) == 2
    # the reply markers stay control tokens, as the model writes them
    assert processor.convert_tokens_to_ids("<answer>") in runs[0]
    prompt = processor.process_messages(template[:-1])
    n = prompt["input_ids"].shape[1]
    np.testing.assert_array_equal(example.input_ids[:n], prompt["input_ids"][0])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        np.testing.assert_array_equal(example.media[key], prompt[key])


def test_a_batch_is_right_padded_and_gives_the_reference_loss(glm4v_checkpoint, tmp_path):
    path, ref, _ = glm4v_checkpoint
    picture(56, 84, 4).save(tmp_path / "b.png")
    lines = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": "b.png"}]},
                {"role": "assistant", "content": "A picture of noise."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hello! How are you today? Let's think step by step."},
                {"role": "assistant", "content": "I am fine, thank you."},
            ]
        },
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    processor = Processor.from_pretrained(path)
    data = ConversationData(tmp_path / "train.jsonl", processor)
    examples = [data[0], data[1]]
    batch = collate(examples, processor.tokenizer.pad_token_id)
    short = int(np.argmin([len(e) for e in examples]))
    assert batch["attention_mask"][short, -1] == 0 and batch["labels"][short, -1] == IGNORE_INDEX
    np.testing.assert_array_equal(batch["pixel_values"], examples[0].media["pixel_values"])
    model = load_model(path)
    loss = model(
        **{k: mx.array(v) for k, v in batch.items() if k != "labels"}, labels=batch["labels"]
    ).loss
    cfg = model.config
    types = token_types(
        batch["input_ids"], cfg.image_token_id, cfg.video_start_token_id, cfg.video_end_token_id
    )
    with torch.no_grad():
        reference = {**batch, "mm_token_type_ids": types}
        want = ref(**{k: torch.tensor(v) for k, v in reference.items()}).loss.item()
    assert abs(float(loss) - want) <= 1e-5 * want


BAD = [
    ("{not json", "line 1: not valid JSON"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "line 1: messages[0].role 'bot'"),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
        '{"url": "missing.png"}}]}, {"role": "assistant", "content": "x"}]}',
        "line 1: messages[0].content[0]: missing.png is not a file.",
    ),
    (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": '
        '[{"function": {"name": "f", "arguments": "{oops"}}]}]}',
        "line 1: messages[1].tool_calls[0].function.arguments is not valid JSON.",
    ),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 1: `messages` holds no assistant"),
    (
        '{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}',
        "line 1: messages[0].content[0]: content part type 'audio'",
    ),
]


@pytest.mark.parametrize("line, message", BAD)
def test_bad_records_are_named_in_one_sentence(tmp_path, line, message):
    good = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'
    file = tmp_path / "train.jsonl"
    file.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(Glm4vError) as e:
        read_jsonl(file)
    text = str(e.value)
    assert text.startswith(f"{file} {message.replace('line 1', 'line 3')}"), text
    assert "\n" not in text


# ---- Hugging Face dataset directories (mlx-vlm's form: messages and images columns) -------------


def same_examples(a, b):
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.media.keys() == b.media.keys()
    for key in a.media:
        np.testing.assert_array_equal(a.media[key], b.media[key])


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_a_dataset_row_gives_what_its_jsonl_line_gives(moe, tmp_path, layout):
    """The multi-turn conversation with tools and two images, as a JSONL line and as a dataset
    row (contents as part lists, images as marks filled from the images column, one by bytes and
    one by path): the same ids, labels and pixels."""
    record, _ = conversation(tmp_path)
    row = as_row(record, tmp_path)
    if layout == "parquet":
        write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", [row, row])
    else:
        write_saved(tmp_path, [row, row])
    training, valid = read_data(tmp_path)
    assert len(training) == 2 and valid is None
    want = encode(moe, parse_record(record, "data.jsonl line 1", tmp_path))
    assert len(want.media["image_grid_thw"]) == 2
    same_examples(encode(moe, training[1]), want)
    # the labels are the assistant turns' (what the JSONL test checks), not the prompt
    assert len(labelled_runs(want.labels)) == 3


def test_images_beyond_the_marks_go_first_in_the_last_user_turn(moe, tmp_path):
    """As mlx-vlm places them for GLM-V: a row with plain-string turns and two images."""
    first, second = picture(56, 56, 5), picture(56, 84, 6)
    row = {
        "messages": [
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Compare them."},
            {"role": "assistant", "content": "The second is wider."},
        ],
        "images": [{"bytes": png_bytes(first), "path": "a.png"}, {"bytes": png_bytes(second)}],
    }
    write_parquet(tmp_path / "train.parquet", [row])
    [got], _ = read_data(tmp_path)
    record = {"messages": json.loads(json.dumps(row["messages"]))}
    record["messages"][2]["content"] = [
        {"type": "image_url", "image_url": data_url(png_bytes(first))},
        {"type": "image_url", "image_url": data_url(png_bytes(second))},
        {"type": "text", "text": "Compare them."},
    ]
    same_examples(encode(moe, got), encode(moe, parse_record(record, "x", tmp_path)))


def test_splits_are_found_by_file_name_and_by_dataset_dict(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]}
        for i in range(5)
    ]
    hub = tmp_path / "hub"
    write_parquet(hub / "data" / "train-00000-of-00002.parquet", rows[:2])
    write_parquet(hub / "data" / "train-00001-of-00002.parquet", rows[2:3])
    write_parquet(hub / "data" / "validation-00000-of-00001.parquet", rows[3:4])
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", rows[4:])
    assert sorted(dataset_splits(hub)) == ["test", "train", "validation"]
    training, valid = read_data(hub)
    assert [c.messages[0]["content"] for c in training] == ["Q0", "Q1", "Q2"]
    assert [c.messages[0]["content"] for c in valid] == ["Q3"]

    saved = tmp_path / "saved"
    write_saved(saved / "train", rows[:3])
    write_saved(saved / "valid", rows[3:])
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "valid"]}))
    training, valid = read_data(saved)
    assert len(training) == 3 and [c.messages[0]["content"] for c in valid] == ["Q3", "Q4"]

    only_test = tmp_path / "only_test"
    write_parquet(only_test / "test.parquet", rows)
    with pytest.raises(Glm4vError, match="has no train split \\(its splits: test\\)"):
        read_data(only_test)


def test_datasets_own_files_read_the_same(moe, tmp_path):
    """What the `datasets` package itself writes (save_to_disk of a DatasetDict, to_parquet),
    with images cast to its Image feature: the same examples as the JSONL line."""
    datasets = pytest.importorskip("datasets")
    record, _ = conversation(tmp_path)
    row = as_row(record, tmp_path, own_path=None)
    data = datasets.Dataset.from_list([row, row])
    data = data.cast_column("images", datasets.Sequence(datasets.Image()))
    datasets.DatasetDict(train=data, validation=data.select([0])).save_to_disk(tmp_path / "saved")
    data.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    want = encode(moe, parse_record(record, "x", tmp_path))
    for root in (tmp_path / "saved", tmp_path / "hub"):
        training, valid = read_data(root)
        assert len(training) == 2 and (valid is None) == (root.name == "hub")
        same_examples(encode(moe, training[0]), want)


GOOD_ROW = {
    "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
    ],
    "images": [{"bytes": b"", "path": "pic.png"}],
}

BAD_ROWS = [
    ({"images": []}, "row 1: the messages column marks 1 image but the images column holds 0."),
    (
        {"images": [{"bytes": None, "path": "gone.png"}]},
        "row 1: images[0] has no bytes and its path gone.png is not a file.",
    ),
    ({"images": [{"bytes": None, "path": None}]}, "row 1: images[0] holds neither image bytes"),
    ({"images": [{"bytes": b"GIF8 no", "path": None}]}, "row 1: images[0] is not a readable image"),
    (
        {"messages": [{"role": "bot", "content": [{"type": "text", "text": "x"}]}], "images": []},
        "row 1: messages[0].role 'bot' is not one of",
    ),
    ({"messages": "[{oops"}, "row 1: the messages column holds a string that is not JSON."),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "images": []},
        "row 1: `messages` holds no assistant turn to learn from.",
    ),
]


@pytest.mark.parametrize("change, message", BAD_ROWS)
def test_bad_rows_are_named_in_one_sentence(tmp_path, change, message):
    picture(28, 28, 7).save(tmp_path / "pic.png")
    file = tmp_path / "data" / "train-00000-of-00001.parquet"
    bad = {**GOOD_ROW, **change}
    for key in ("messages", "images"):  # one column type for both rows
        if isinstance(bad[key], str):
            good = {**GOOD_ROW, key: json.dumps(GOOD_ROW[key])}
            break
    else:
        good = GOOD_ROW
    write_parquet(file, [good, bad])
    with pytest.raises(Glm4vError) as e:
        read_data(tmp_path)
    text = str(e.value)
    assert text.startswith(f"{file} {message}"), text
    assert "\n" not in text


def test_a_file_without_a_messages_column_is_refused(tmp_path):
    file = tmp_path / "train.parquet"
    write_parquet(file, [{"conversation": "x", "image": None}])
    with pytest.raises(Glm4vError) as e:
        read_data(tmp_path)
    assert str(e.value) == (
        f"{file} has no `messages` column (its columns: conversation, image); a dataset needs "
        "mlx-vlm's form, `messages` and `images`."
    )

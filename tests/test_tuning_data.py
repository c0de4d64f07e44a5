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
from helpers import data_url, picture, png_bytes, write_scrolling_video

from mlx_glm4v.checkpoints.loader import load_model
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.inputs.processor import DATA_OPEN, Processor
from mlx_glm4v.models.loss import IGNORE_INDEX
from mlx_glm4v.models.rope_index import token_types
from mlx_glm4v.tuning.data import ConversationData, collate, encode, parse_record, read_jsonl

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

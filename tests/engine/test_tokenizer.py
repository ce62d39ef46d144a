import json
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.errors import InvalidRequestError, ModelLoadError
from engine.tokenizer import (
    ByteTokenizer,
    ChatTemplate,
    HFTokenizer,
    IncrementalDetokenizer,
    load_tokenizer,
)

SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello tokenizer!",
    "你好，世界。今天天气很好，我们去公园散步吧。机器学习",
    "日本語のテキストも少し入れておきます。ありがとう",
    "Emoji: 😀 😃 🎉 👍🏽 👨‍👩‍👧 🇫🇷 and more 🚀",
    "Café, naïve, résumé, Ångström, façade, jalapeño, Zoë",
    "Combining: e\u0301 a\u0308 n\u0303 o\u0302",
]
MULTIBYTE_TEXTS = [
    "你好，世界！机器学习很有趣。",
    "Emoji 🎉👍🏽👨‍👩‍👧🇫🇷🚀 done",
    "Combining e\u0301 a\u0308 n\u0303 and precomposed é ä ñ",
    "mixed 日本語 café 😀 テキスト",
    "rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀 ﷽",
]

# Indented block tags only render cleanly with trim_blocks + lstrip_blocks, as in transformers.
CHATML_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "你好 😀"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Bye"},
    ],
]


def train_backend() -> BackendTokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    return backend


def write_model_dir(directory: Path, **config_overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    train_backend().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"content": "<|im_end|>", "special": True, "__type": "AddedToken"},
        "pad_token": "<pad>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        **config_overrides,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def hf(model_dir) -> HFTokenizer:
    return HFTokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def oracle(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def stream(tokenizer, ids, skip_special_tokens=True) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    pieces = [detok.push(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(pieces) + tail
    return pieces, tail


# --- HFTokenizer against transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello world", "  spaces  and\ttabs\n", *MULTIBYTE_TEXTS, "<|im_start|>user\nhi"])
def test_hf_encode_decode_match_transformers(hf, oracle, text):
    for add_special_tokens in (True, False):
        assert hf.encode(text, add_special_tokens) == oracle.encode(text, add_special_tokens=add_special_tokens)
    ids = [hf.bos_token_id, *hf.encode(text), *hf.eos_token_ids]
    for skip in (True, False):
        assert hf.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_hf_chat_template_matches_transformers(hf, oracle, messages, add_generation_prompt):
    expected = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert hf.apply_chat_template(messages, add_generation_prompt) == expected
    assert expected.startswith("<s>\n<|im_start|>")  # the oracle really used the template and bos_token


def test_hf_special_tokens_and_ids(hf, oracle):
    assert hf.bos_token_id == oracle.convert_tokens_to_ids("<s>")
    assert hf.eos_token_ids == (oracle.convert_tokens_to_ids("<|im_end|>"),)
    assert hf.vocab_size == len(oracle)
    assert all(hf.is_special(oracle.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS)
    assert not any(hf.is_special(i) for i in hf.encode("Hello 你好"))


# --- HFTokenizer config handling --------------------------------------------------------------------------------


def test_add_bos_token_in_config_makes_encode_add_bos(tmp_path):
    tokenizer = HFTokenizer.from_dir(write_model_dir(tmp_path / "m", add_bos_token=True))
    plain = tokenizer.encode("Hello", add_special_tokens=False)
    assert tokenizer.encode("Hello") == [tokenizer.bos_token_id, *plain]
    assert tokenizer.decode(tokenizer.encode("Hello")) == "Hello"


def test_without_add_bos_token_encode_follows_tokenizer_json(hf):
    assert hf.encode("Hello") == hf.encode("Hello", add_special_tokens=False)


def test_eos_ids_also_come_from_model_configs(tmp_path):
    directory = write_model_dir(tmp_path / "m")
    (directory / "config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    tokenizer = HFTokenizer.from_dir(directory)
    assert tokenizer.eos_token_ids == (3, 4, 1)  # <|im_end|> first, no duplicates


def test_added_tokens_decoder_marks_more_tokens_special(tmp_path):
    directory = write_model_dir(tmp_path / "m", added_tokens_decoder={"300": {"content": "x", "special": True}})
    tokenizer = HFTokenizer.from_dir(directory)
    assert tokenizer.is_special(300)
    assert tokenizer.decode([300, *tokenizer.encode("ok")]) == "ok"
    assert tokenizer.decode([300], skip_special_tokens=False) != ""


def test_template_without_file_falls_back_to_builtin(tmp_path):
    tokenizer = HFTokenizer.from_dir(write_model_dir(tmp_path / "m", chat_template=None))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"


def test_chat_template_jinja_file_wins_over_config(tmp_path):
    directory = write_model_dir(tmp_path / "m")
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tokenizer = HFTokenizer.from_dir(directory)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


def test_named_template_list_uses_default(tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    tokenizer = HFTokenizer.from_dir(write_model_dir(tmp_path / "m", chat_template=templates))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "DEFAULT"


def test_raise_exception_in_template_is_invalid_request(hf):
    with pytest.raises(InvalidRequestError, match="unknown role: tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_runtime_error_is_invalid_request():
    template = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequestError, match="chat template"):
        template.render([{"role": "user", "content": "hi"}], True, {})


def test_template_helpers_like_transformers():
    template = ChatTemplate("{{ strftime_now('%Y') }} {{ messages | tojson }}")
    year = str(datetime.now().year)
    assert template.render([{"content": "é<>"}], False, {}) == f'{year} [{{"content": "é<>"}}]'


def test_template_sandbox_blocks_attribute_escapes():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        template.render([], False, {})


# --- load errors ---------------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        HFTokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path, model_dir):
    directory = tmp_path / "m"
    directory.mkdir()
    shutil.copy(model_dir / "tokenizer_config.json", directory)
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        HFTokenizer.from_dir(directory)


def test_malformed_tokenizer_json(tmp_path):
    directory = write_model_dir(tmp_path / "m")
    (directory / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        HFTokenizer.from_dir(directory)


@pytest.mark.parametrize(
    "file_name, content",
    [
        ("tokenizer_config.json", "{not json"),
        ("tokenizer_config.json", "[1, 2]"),
        ("tokenizer_config.json", json.dumps({"bos_token": 7})),
        ("tokenizer_config.json", json.dumps({"chat_template": "{% for %}"})),
        ("tokenizer_config.json", json.dumps({"chat_template": 5})),
        ("config.json", json.dumps({"eos_token_id": "two"})),
        ("generation_config.json", "{"),
    ],
)
def test_malformed_config_files(tmp_path, file_name, content):
    directory = write_model_dir(tmp_path / "m")
    (directory / file_name).write_text(content)
    with pytest.raises(ModelLoadError, match=file_name):
        HFTokenizer.from_dir(directory)


def test_load_tokenizer_picks_by_directory(tmp_path, model_dir):
    assert isinstance(load_tokenizer(model_dir, 1000), HFTokenizer)
    assert load_tokenizer(None, 1000).vocab_size == 1000
    assert isinstance(load_tokenizer(tmp_path, 1000), ByteTokenizer)


def test_module_does_not_import_torch_or_transformers():
    code = "import sys, engine.tokenizer; assert not {'torch', 'transformers'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --- ByteTokenizer ------------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids():
    tokenizer = ByteTokenizer(32000)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.vocab_size) == (1, (2,), 32000)
    assert tokenizer.encode("A") == [1, 3 + 65]
    assert tokenizer.encode("é", add_special_tokens=False) == [3 + 0xC3, 3 + 0xA9]
    assert [tokenizer.is_special(i) for i in (0, 1, 2, 3, 259)] == [True, True, True, False, False]


def test_byte_tokenizer_rejects_small_vocab():
    with pytest.raises(ValueError):
        ByteTokenizer(258)
    ByteTokenizer(259)


def test_byte_tokenizer_aliases_high_ids():
    tokenizer = ByteTokenizer(32000)
    assert tokenizer.decode([3 + 65 + 256, 3 + 66 + 256 * 100]) == "AB"


def test_byte_tokenizer_decode_special_tokens():
    tokenizer = ByteTokenizer(300)
    ids = [1, *tokenizer.encode("hi", add_special_tokens=False), 2, 0]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>hi</s><pad>"


@given(st.text())
def test_byte_tokenizer_round_trips_unicode(text):
    tokenizer = ByteTokenizer(512)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_byte_tokenizer_chat_template():
    tokenizer = ByteTokenizer(300)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    without_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert without_prompt == "<|system|>\nBe brief.\n<|user|>\nHi\n"
    with pytest.raises(InvalidRequestError):
        tokenizer.apply_chat_template([{"role": "user"}])


# --- IncrementalDetokenizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_hf_streaming_equals_decode_without_broken_chars(hf, text):
    ids = hf.encode(text)
    assert any("\ufffd" in hf.decode([i]) for i in ids), "precondition: some token splits a character"
    pieces, tail = stream(hf, ids)
    assert "".join(pieces) + tail == hf.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert tail == ""


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_byte_streaming_equals_decode_without_broken_chars(text):
    tokenizer = ByteTokenizer(32000)
    ids = tokenizer.encode(text)
    pieces, tail = stream(tokenizer, ids)
    assert "".join(pieces) + tail == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(piece == "" for piece in pieces) > 1  # partial characters were held back


def test_streaming_keeps_sentencepiece_spaces(tmp_path):
    """Metaspace decoders drop the first token's leading space; the context window keeps later spaces."""
    backend = BackendTokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer.from_dir(tmp_path)
    text = "Hello world, the quick brown fox"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    _check_stream_contract(tokenizer, ids, skip_special_tokens=True)


def test_hf_streaming_keeps_special_tokens_when_asked(hf):
    ids = [hf.bos_token_id, *hf.encode("你好"), *hf.eos_token_ids]
    pieces, tail = stream(hf, ids, skip_special_tokens=False)
    assert "".join(pieces) + tail == "<s>你好<|im_end|>"


INVALID_UTF8 = [b"\xff", b"ok\xe4\xb8", b"\xe4\xb8a\xe4\xb8\xad", b"\xc0\xaf\xed\xa0\x80z", b"\xf0\x9f\x98"]


@pytest.mark.parametrize("data", INVALID_UTF8)
def test_invalid_utf8_streams_like_decode(model_dir, hf, data):
    expected = data.decode("utf-8", errors="replace")
    byte_pieces, byte_tail = stream(ByteTokenizer(300), [3 + b for b in data])
    assert "".join(byte_pieces) + byte_tail == expected
    # The byte-level vocabulary has one token per byte, spelled with GPT-2's byte-to-unicode table.
    backend = BackendTokenizer.from_file(str(model_dir / "tokenizer.json"))
    hf_ids = [backend.token_to_id(_GPT2_BYTE_CHARS[b]) for b in data]
    assert hf.decode(hf_ids) == expected
    pieces, tail = stream(hf, hf_ids)
    assert "".join(pieces) + tail == expected


def _gpt2_byte_chars() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


_GPT2_BYTE_CHARS = _gpt2_byte_chars()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 32000 - 1), max_size=60), st.booleans())
def test_byte_streaming_property(ids, skip_special_tokens):
    _check_stream_contract(ByteTokenizer(32000), ids, skip_special_tokens)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 499), max_size=40), st.booleans())
def test_hf_streaming_property(hf, ids, skip_special_tokens):
    _check_stream_contract(hf, ids, skip_special_tokens)


def _check_stream_contract(tokenizer, ids, skip_special_tokens):
    full = tokenizer.decode(ids, skip_special_tokens)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    for i in ids:
        detok.push(i)
        assert full.startswith(detok.text)  # never emits text that later turns out different
    detok.flush()
    assert detok.text == full
    if "\ufffd" not in full:
        assert "\ufffd" not in detok.text


def test_hf_streaming_decodes_small_windows(model_dir):
    """Each push decodes a few tokens, not the whole sequence (only flush does)."""
    tokenizer = HFTokenizer.from_dir(model_dir)
    window_sizes = []
    real_decode = tokenizer.decode

    def counting_decode(token_ids, skip_special_tokens=True):
        window_sizes.append(len(token_ids))
        return real_decode(token_ids, skip_special_tokens)

    tokenizer.decode = counting_decode
    ids = tokenizer.encode(" ".join(MULTIBYTE_TEXTS * 10))
    detok = IncrementalDetokenizer(tokenizer)
    for token_id in ids:
        detok.push(token_id)
    assert len(ids) > 200 and max(window_sizes) <= 12
    detok.flush()
    assert detok.text == real_decode(ids)


def test_a_directory_with_only_a_slow_tokenizer_is_refused(tmp_path):
    from engine.errors import ModelLoadError
    from engine.tokenizer import ByteTokenizer, load_tokenizer

    assert isinstance(load_tokenizer(tmp_path, 320), ByteTokenizer)  # a bare checkpoint: bytes
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_tokenizer(tmp_path, 320)

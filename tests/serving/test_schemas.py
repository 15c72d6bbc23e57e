"""Request pieces without a server: the prompt forms a completion takes, and chat templates
(the checkpoint's tokenizer_config.json, else the plain one)."""
import json
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from infini_trt.export.errors import InfiniTrtError  # noqa: E402
from infini_trt.runtime import bundled_model  # noqa: E402
from infini_trt.runtime.serving.schemas import APIError, ChatTemplate, prompt_list  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("prompt, expected", [
    ("text", ["text"]), ([1, 2], [[1, 2]]), (["a", "b"], ["a", "b"]),
    ([[1], [2, 3]], [[1], [2, 3]]), (["a", [4]], ["a", [4]]),
], ids=["text", "ids", "texts", "id-lists", "mixed"])
def test_prompt_forms(prompt, expected):
    assert prompt_list(prompt) == expected


@pytest.mark.parametrize("prompt", [[], [True, 2], [1.0], {"a": 1}, None, [[1], "a", 3]],
                         ids=["empty", "bool", "float", "object", "null", "ragged"])
def test_bad_prompt_forms(prompt):
    with pytest.raises(APIError) as info:
        prompt_list(prompt)
    assert info.value.status == 400 and info.value.param == "prompt"


def test_the_bundled_model_has_the_plain_template():
    template = ChatTemplate.of(bundled_model())
    assert template.kind == "plain"
    assert template.render(MESSAGES) == "system: Be brief.\nuser: Hi\nassistant:"


def checkpoint_with(tmp_path, config):
    shutil.copyfile(bundled_model() / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_checkpoints_chat_template(tmp_path):
    source = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    model = checkpoint_with(tmp_path, {"chat_template": source, "bos_token": {"content": "<s>"}})
    template = ChatTemplate.of(model)
    assert template.kind == "tokenizer"
    assert template.render(MESSAGES) == "<s><system>Be brief.\n<user>Hi\n<assistant>"


def test_named_templates_and_template_errors(tmp_path):
    source = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
              "{% endif %}{{ messages[0]['content'] }}")
    model = checkpoint_with(tmp_path, {"chat_template": [
        {"name": "tool_use", "template": "no"}, {"name": "default", "template": source}]})
    template = ChatTemplate.of(model)
    assert template.render(MESSAGES[1:]) == "Hi"
    with pytest.raises(InfiniTrtError, match="user first"):
        template.render(MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(InfiniTrtError, match="cannot read"):
        ChatTemplate.of(model)


def test_chat_template_jinja_wins_as_in_transformers(tmp_path):
    """Newer transformers saves the template as chat_template.jinja beside tokenizer.json and
    reads it before tokenizer_config.json's; the special tokens stay in the config."""
    model = checkpoint_with(tmp_path, {"chat_template": "from the config",
                                       "bos_token": "<s>"})
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{{ messages[-1]['content'] }}", encoding="utf-8")
    assert ChatTemplate.of(model).render(MESSAGES) == "<s>Hi"
    (tmp_path / "tokenizer_config.json").unlink()
    template = ChatTemplate.of(model)
    assert template.kind == "tokenizer" and template.render(MESSAGES) == "Hi"

"""The model registry: register / create / list / duplicate and unknown names."""
import pytest

from fastdense.models import registry
from fastdense.models.registry import create_model, is_model, list_models, register_model


@pytest.fixture
def fresh_registry(monkeypatch):
    """An empty registry for the test; the real one is restored afterwards."""
    monkeypatch.setattr(registry, "_MODELS", {})
    monkeypatch.setattr(registry, "_KINDS", {})
    return registry


def test_register_create_and_list(fresh_registry):
    @register_model
    def tiny_net(width=2, depth=1):
        return ("tiny_net", width, depth)

    @register_model
    def tiny_other():
        return "other"

    assert tiny_net() == ("tiny_net", 2, 1)  # the decorator returns the function itself
    assert create_model("tiny_net", width=8) == ("tiny_net", 8, 1)
    assert is_model("tiny_net") and not is_model("tiny_nett")
    assert list_models() == ["tiny_net", "tiny_other"]
    assert list_models("*other") == ["tiny_other"]
    assert list_models("TINY*") == []  # case-sensitive, like the names


def _named(name, value):
    def fn(**kwargs):
        return value
    fn.__name__ = fn.__qualname__ = name
    return fn


def test_duplicate_name_raises(fresh_registry):
    def first():
        return 1

    def second():
        return 2

    first.__name__ = second.__name__ = "dup_net"
    register_model(first)
    with pytest.raises(ValueError, match="'dup_net' is already registered"):
        register_model(second)
    assert create_model("dup_net") == 1  # the first registration stays


def test_reregistering_same_origin_replaces(fresh_registry):
    # A module reload re-runs the decorator for a function of the same module and qualname:
    # that must not fail, and the new function wins.
    register_model(_named("same", 1))
    register_model(_named("same", 2))
    assert create_model("same") == 2


def test_unknown_name_lists_close_matches_and_all(fresh_registry):
    for name in ("swin_t", "swin_s", "resnet"):
        register_model(_named(name, name))
    with pytest.raises(ValueError) as err:
        create_model("swin_tt")
    msg = str(err.value)
    assert "'swin_tt'" in msg and "Did you mean 'swin_t'" in msg
    assert "Registered models: resnet, swin_s, swin_t." in msg
    with pytest.raises(ValueError, match="Registered models: resnet, swin_s, swin_t.") as err:
        create_model("zzz")
    assert "Did you mean" not in str(err.value)


def test_register_rejects_non_callables(fresh_registry):
    with pytest.raises(TypeError):
        register_model(42)


def test_swin_constructors_are_registered():
    import fastdense.models.swin  # noqa: F401  (registers on import)

    assert {"swin_t", "swin_s", "swin_b"} <= set(list_models("swin_*"))
    model = create_model("swin_t", num_classes=0, depths=(1, 1, 1, 1))
    assert type(model).__name__ == "SwinTransformer" and model.depths == (1, 1, 1, 1)


def test_kinds_sort_the_models_for_the_command_line(fresh_registry):
    @register_model(kind="multitask")
    def a_multitask(tasks=("x",)):
        return list(tasks)

    @register_model(kind="fewshot")
    def a_fewshot():
        return "f"

    @register_model
    def a_backbone():
        return "b"

    assert a_multitask(tasks=["y"]) == ["y"]  # the parametrised decorator returns the function too
    assert list_models(kind="multitask") == ["a_multitask"]
    assert list_models(kind="fewshot") == ["a_fewshot"]
    assert list_models(kind="backbone") == ["a_backbone"]
    assert registry.model_kind("a_fewshot") == "fewshot"
    with pytest.raises(ValueError, match="kind must be one of"):
        register_model(kind="detector")


def test_the_packaged_models_are_registered_with_their_kind():
    import fastdense.models as models

    assert {"tiny_mtl", "tiny_mtl_small", "mtlora_swin_t"} <= set(models.list_models(kind="multitask"))
    assert "tiny_fewshot" in models.list_models(kind="fewshot")
    assert {"swin_t", "swin_s", "swin_b"} <= set(models.list_models(kind="backbone"))
    net = models.create_model("tiny_mtl_small", tasks=["semseg"])
    assert isinstance(net, models.TinyMTL) and net.tasks == ["semseg"]

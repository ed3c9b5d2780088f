"""The architecture's promises: one capture per source model, models captured with torch.export where
torch.fx cannot trace them, op handlers and methods added from outside without touching a stage, grouped
convolutions and channel shuffles merged by every method, and layers that point down."""
import ast
import pathlib
import warnings

import pytest
import torch
from torch import nn

import pleas
from conftest import assert_close
from pleas.methods import METHODS, Method, Outcome, register_method
from pleas.methods import stages
from pleas.ops.layers import dense
from toy_models import VGGBN, Grouped, Shuffled, randomise_norm_stats

SRC = pathlib.Path(pleas.__file__).parent


def _pair(factory, seeds=(0, 1)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(randomise_norm_stats(factory(), s).eval())
    return out


def test_a_merge_captures_each_source_model_once(monkeypatch):
    import pleas.setup

    seen = {"sources": 0, "merged": 0}
    real_setup, real_stages = pleas.setup.capture, stages.capture

    def count(kind, real):
        def wrapped(*args, **kwargs):
            seen[kind] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(pleas.setup, "capture", count("sources", real_setup))
    monkeypatch.setattr(stages, "capture", count("merged", real_stages))
    a, b = _pair(VGGBN)
    pleas.merge(a, b, torch.randn(32, 3, 16, 16), method="pleas", budget=1.5, progress=False)
    assert seen == {"sources": 2, "merged": 1}  # A, B, and the merged model (walked by the refit)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_hugging_face_models_are_captured_with_export_and_permutation_invariant(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16,
                                                                     n_layer=2, n_head=2))
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32))
    else:
        model = transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=32,
                                                               max_position_embeddings=32))
    model.eval()
    ids = torch.randint(0, 64, (2, 8))
    program = pleas.capture(model, ids, copy_model=True)
    assert program.frontend == "export"  # torch.fx cannot trace transformers 5's models
    spec = pleas.analyze(program).spec
    assert any("mlp" in g.name or "intermediate" in g.name for g in spec)  # the MLPs are groups
    assert any(g.width <= 4 for g in spec)  # and so are the attention heads (a few units each)
    permuted = pleas.build_model(model, pleas.permute_state_dict(model.state_dict(), spec, spec.random_permutations(3)))
    with torch.no_grad():
        out, out_p = model(torch.randint(0, 64, (3, 5))), None
        ids2 = torch.randint(0, 64, (3, 5))
        out, out_p = model(ids2), permuted.eval()(ids2)
    key = "logits" if family != "bert" else "last_hidden_state"
    assert_close(out[key], out_p[key])


class EinsumLinear(nn.Module):
    """A linear map written with einsum, which no built-in handler knows."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return torch.einsum("ni,oi->no", x, self.weight)


class WithEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = EinsumLinear(16, 12)
        self.c = nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture
def einsum_handler():
    def trace(ctx):  # everything pleas needs of the op: its groups, and that it is a refittable linear map
        return dense(ctx, ctx.arg(0), ctx.param("weight"), None)

    def resize(module):
        pass  # nothing but the weight knows the widths

    pleas.register_module_handler(EinsumLinear, trace, resize)
    yield
    from pleas.ops.registry import MODULE_HANDLERS, RESIZERS

    MODULE_HANDLERS.pop(EinsumLinear)
    RESIZERS.pop(EinsumLinear)


def test_an_op_handler_added_in_a_test_file_merges_with_no_stage_edited(einsum_handler):
    a, b = _pair(WithEinsum)
    x = torch.randn(256, 6)
    spec = pleas.build_spec(a, x[:2])
    assert [g.width for g in spec] == [16, 12]
    result = pleas.merge(a, b, x, method="pleas", budget=1.5, progress=False)
    assert "b" in [layer["layer"] for layer in result.report["refit"]]  # the refit fitted the new op
    assert result.model.b.weight.shape[0] > 12
    with torch.no_grad():
        assert torch.isfinite(result.model(x)).all()
    apart = pleas.merge(a, b, x, method="ensemble", progress=False).model
    with torch.no_grad():
        assert_close(apart(x), (a(x) + b(x)) / 2)


@pytest.fixture
def first_method():
    @register_method
    class First(Method):
        """Model A alone, re-expressed through the stages: every unit of A kept, every unit of B dropped."""

        name = "first-model-only"
        summary = "model A (a test method)"
        max_budget = 1.0

        def run(self, setup):
            maps = {}
            for g in setup.spec:
                keep = torch.cat([torch.eye(g.width), torch.zeros(g.width, g.width)], 1).double()
                maps[g.name] = pleas.GroupMap(keep, torch.cat([torch.eye(g.width), torch.zeros(g.width, g.width)]).double())
            built = stages.build(setup, maps)
            return Outcome(stages.finished(setup, built), built)

    yield
    METHODS.pop("first-model-only")


def test_a_method_added_in_a_test_file_runs_through_merge(first_method):
    a, b = _pair(VGGBN)
    x = torch.randn(16, 3, 16, 16)
    result = pleas.merge(a, b, x, method="first-model-only", heads="separate", progress=False)
    with torch.no_grad():
        out_a, _ = result.model(x)
        assert_close(out_a, a(x))
    assert "first-model-only" in pleas.methods.describe_methods()


def _merges_by_every_method(a, b, x, runs, network: bool):
    with torch.no_grad():
        want = (a(x) + b(x)) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method, budget in runs:
            result = pleas.merge(a, b, x, method=method, budget=budget, progress=False)
            with torch.no_grad():
                out = result.model(x)
            assert out.shape == want.shape and torch.isfinite(out).all(), (method, budget)
            if method == "ensemble":
                assert_close(out, want)
                assert result.report["ensemble"] == ("network" if network else "modules")
            else:
                assert result.report["size"]["relative_dense"] <= budget + 1e-9, (method, budget)


EVERY_METHOD = [("ensemble", 1.0), ("average", 1.0), ("rebasin", 1.0), ("rebasin", 1.5), ("zipit", 1.0),
                ("zipit", 1.5), ("regmean", 1.0), ("pleas", 1.0), ("pleas", 1.5)]


@pytest.mark.parametrize("factory,network", [(Grouped, True), (Shuffled, True)])
def test_grouped_convolutions_and_channel_shuffles_merge_by_every_method(factory, network):
    a, b = _pair(factory)
    _merges_by_every_method(a, b, torch.randn(64, 3, 8, 8), EVERY_METHOD, network)


@pytest.mark.parametrize("name", ["regnet_x_400mf", "shufflenet_v2_x0_5"])
def test_torchvision_regnet_and_shufflenet_merge(name):
    """The real architectures (every method is run on them by the toy versions above and in the README's
    measurements; here the ensemble and PLeaS above 1x, to keep the suite fast: their grouped convolutions
    are slow on a CPU)."""
    torchvision = pytest.importorskip("torchvision")
    a, b = _pair(lambda: torchvision.models.get_model(name, num_classes=10))
    _merges_by_every_method(a, b, torch.randn(4, 3, 32, 32), [("ensemble", 1.0), ("pleas", 1.5)],
                            name.startswith("regnet"))


def test_convnext_ensemble_is_exact_and_says_why_it_is_not_one_network():
    timm = pytest.importorskip("timm")
    a, b = _pair(lambda: timm.create_model("convnext_atto", num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    result = pleas.merge(a, b, x, method="ensemble", progress=False)
    with torch.no_grad():
        assert_close(result.model(x), (a(x) + b(x)) / 2)
    assert result.report["ensemble"] == "modules" and "norm" in result.report["ensemble_reason"]


def _imports() -> dict[str, set[str]]:
    """Every module of pleas -> the pleas modules it imports (function-level imports included)."""
    def name(path):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    found.add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        edges[module] = {t for t in found if t in modules and t != module}
    return edges


def test_no_import_cycles():
    edges = _imports()
    state, cycles = {}, []

    def visit(u, path):
        state[u] = "open"
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles[:3]


def test_the_core_imports_nothing_from_the_demo_benchmark_or_experiments():
    top = ("pleas.demo", "pleas.bench", "pleas.experiments", "pleas.cli", "pleas.__main__")
    edges = _imports()
    for module, targets in edges.items():
        if module.startswith(top):
            continue
        bad = [t for t in targets if t.startswith(top)]
        assert not bad, (module, bad)

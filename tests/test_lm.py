"""Language-model runs (`task: lm`) and uptraining, against independent references: scores
recomputed window by window with torch's own losses, KL against torch's kl_div, a tie that
changes nothing against the untied teacher, Hugging Face's own loading of a saved checkpoint."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tiedmask.cli import main
from tiedmask.training.corpus import SPLITS, load_corpus, split_of
from tiedmask.training.lm import distillation_kl, load_lm_run, score_tokens, window_starts
from tiedmask.training.settings import load_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

WORDS = "the a tied block loops over its layers while masks keep each pass apart and the model learns".split()
LLAMA = ("{hidden_size: 32, num_hidden_layers: 4, intermediate_size: 64, num_attention_heads: 2, "
         "num_key_value_heads: 2, tie_word_embeddings: true}")


def write_corpus(root: Path, name: str = "toy", documents: int = 80) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for i in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(12)]
        (folder / f"doc{i:03d}.txt").write_text(" ".join(sentences))
    return folder


def lm_args(root: Path, *extra: str) -> list[str]:
    return ["--task", "lm", "--model", "hf:llama", "--execution", "untied", "--masks.scope", "dense",
            "--model.args", LLAMA, "--data", "toy", "--data.root", str(root), "--lm.tokenizer", "bytes",
            "--lm.seq_len", "32", "--lm.epoch_tokens", "3000", "--batch_size", "8", "--eval_batch_size", "16",
            "--optim.lr", "3e-3", "--optim.label_smoothing", "0", "--epochs", "2", "--precision", "fp32",
            "--progress", "false", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small untied run, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("lm")
    write_corpus(root)
    assert main(["train", *lm_args(root), "--out", str(root / "base")]) == 0
    (write_corpus(root, "binary") / "doc007.txt").write_bytes(b"\xff\xfe not text")  # for the bad cases
    write_corpus(root, "tiny", documents=3)
    import shutil as sh

    sh.copytree(root / "base", root / "unfinished")  # as if still training: no result yet
    (root / "unfinished" / "result.json").unlink()
    assert main(["train", *lm_args(root), "--lm.tokenizer", "bpe", "--lm.vocab_size", "300", "--epochs", "1",
                 "--out", str(root / "other-tokenizer")]) == 0
    return root


def test_documents_are_split_by_their_own_name_whatever_else_the_folder_holds(tmp_path):
    small = load_corpus("toy", write_corpus(tmp_path / "a", documents=80).parent)
    large = load_corpus("toy", write_corpus(tmp_path / "b", documents=160).parent)
    for split in SPLITS:  # the first 80 files are the same in both folders, so are their splits
        assert set(small.documents[split]) <= set(large.documents[split])
    assert sum(small.sizes().values()) == 80
    names = [f"doc{i:03d}.txt" for i in range(2000)]
    shares = {s: sum(split_of(n) == s for n in names) / len(names) for s in SPLITS}
    assert 0.03 < shares["test"] < 0.07 and 0.03 < shares["val"] < 0.07


def test_an_epochs_windows_are_disjoint_and_inside_the_stream():
    gen = torch.Generator().manual_seed(0)
    starts = window_starts(1000, 32, 0, gen)
    ends = starts + 33
    assert int(ends.max()) <= 1000 and int(starts.min()) >= 0
    ordered = starts.sort().values
    assert torch.all(ordered[1:] - ordered[:-1] == 32)  # side by side: each token is a target once
    assert len(window_starts(1000, 32, 5000, torch.Generator().manual_seed(0))) == 5000 // 32


def test_distillation_term_is_temperature_squared_kl_as_torch_computes_it():
    student, teacher = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    t = 2.0
    reference = F.kl_div(F.log_softmax(student / t, -1).flatten(0, 1), F.log_softmax(teacher / t, -1).flatten(0, 1),
                         log_target=True, reduction="batchmean") * t * t
    assert torch.allclose(distillation_kl(student, teacher, t), reference, atol=1e-6)
    assert float(distillation_kl(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_scores_count_every_token_once_as_a_window_by_window_loop_does():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                      num_attention_heads=2, num_key_value_heads=2)
    net = transformers.LlamaForCausalLM(config).eval()
    model = lambda ids: net(input_ids=ids).logits  # noqa: E731
    stream = torch.randint(0, 40, (103,))
    nll, correct = 0.0, 0
    for start in range(0, 102, 10):  # windows of 10 targets and a last one of 2
        window = stream[start:min(start + 11, 103)]
        logits = model(window[None, :-1])[0]
        nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
        correct += int((logits.argmax(-1) == window[1:]).sum())
    loss, acc = score_tokens(_Wrapped(net), stream, 10, 3, torch.device("cpu"), "fp32")
    assert loss == pytest.approx(nll / 102, rel=1e-5)
    assert acc == pytest.approx(correct / 102)


class _Wrapped(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, ids):
        return self.net(input_ids=ids).logits


def test_a_run_learns_and_eval_rescores_it_exactly(trained, capsys):
    result = json.loads((trained / "base" / "result.json").read_text())
    assert result["task"] == "lm" and result["status"] == "ok"
    assert result["test_ppl"] < 60  # a byte model of uniform guesses would score 257
    assert result["test_ppl"] == pytest.approx(math.exp(result["test_loss"]))
    for name in ("tokenizer.json", "corpus.json", "checkpoint.json", "metrics.jsonl"):
        assert (trained / "base" / name).is_file()
    capsys.readouterr()
    assert main(["eval", str(trained / "base")]) == 0
    assert f"test perplexity {result['test_ppl']:.2f}" in capsys.readouterr().out


GPT2 = "{n_embd: 32, n_layer: 2, n_head: 2}"  # dropout 0.1 by default: a resume must redraw it alike


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_an_interrupted_run_resumes_to_the_same_model(trained, monkeypatch, model):
    from tiedmask.training.trainer import Trainer

    extra = ["--model", "hf:gpt2", "--model.args", GPT2] if model == "gpt2" else []
    if model == "gpt2":
        assert main(["train", *lm_args(trained), *extra, "--out", str(trained / "gpt2")]) == 0
    calls = {"n": 0}
    original = Trainer.run_epoch

    def interrupt_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run_epoch", interrupt_second)
    out = trained / f"interrupted-{model}"
    assert main(["train", *lm_args(trained), *extra, "--out", str(out)]) == 130
    monkeypatch.setattr(Trainer, "run_epoch", original)
    assert main(["train", "--resume", str(out)]) == 0
    again = json.loads((out / "result.json").read_text())
    first = json.loads((trained / ("gpt2" if model == "gpt2" else "base") / "result.json").read_text())
    assert again["test_loss"] == first["test_loss"]
    assert again["final_train_loss"] == first["final_train_loss"]


def test_tying_each_block_to_itself_keeps_the_teachers_outputs(trained):
    """group = number of layers: every shared block has one position, its mean is itself."""
    from tiedmask.training.lm import _build_for

    teacher, _, _ = load_lm_run(trained / "base")
    cfg = load_config(overrides=lm_args(trained, "--execution", "unrolled", "--tie.group", "4",
                                        "--tie.init", "mean", "--finetune.init_from", str(trained / "base")))
    student = _build_for(cfg, teacher.net.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.allclose(student(ids), teacher(ids), atol=1e-5)


def test_uptrain_keeps_the_runs_dense_weights_unless_asked_to_mask(trained):
    from tiedmask.experiments.uptrain import uptrain_config

    cfg = uptrain_config(str(trained / "base"), "{group: 2}", 1.0, 0, [])
    assert cfg.model.masks.scope == "dense" and cfg.model.tie.group == 2 and cfg.model.tie.init == "mean"
    assert uptrain_config(str(trained / "base"), "{scope: multi}", 0.0, 0, []).model.masks.scope == "multi"


def test_uptrain_ties_distils_and_records_what_it_did(trained):
    out = trained / "up"
    assert main(["uptrain", str(trained / "base"), "--tie", "{group: 2, scope: multi, density: 0.5, relax: lora, "
                 "relax_rank: 2, relax_init: svd}", "--distill", "1.0", "--tokens", "2000", "--epochs", "1",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["execution"] == "unrolled" and config["model"]["tie"]["init"] == "mean"
    assert config["model"]["masks"]["scope"] == "multi" and config["lm"]["distill"] == 1.0
    assert config["lm"]["epoch_tokens"] == 2000
    result = json.loads((out / "result.json").read_text())
    base = json.loads((trained / "base" / "result.json").read_text())
    assert result["params"] < base["params"]
    assert (out / "tokenizer.json").read_bytes() == (trained / "base" / "tokenizer.json").read_bytes()


def test_a_hugging_face_folder_starts_a_run_with_its_own_weights(trained, tmp_path):
    from tiedmask.core.causal_lm import build_causal_lm
    from tiedmask.training.lm import _build_for

    teacher, cfg, _ = load_lm_run(trained / "base")
    folder = tmp_path / "hf"
    teacher.net.save_pretrained(folder, safe_serialization=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    cfg.finetune.init_from = str(folder)
    cfg.model.args = {}  # the folder's configuration
    student = _build_for(cfg, 257).eval()
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.allclose(student(ids), reloaded(input_ids=ids).logits, atol=1e-5)
    # a run started from the folder trains, and is scored and analysed as any other
    (folder / "tokenizer.json").write_bytes((trained / "base" / "tokenizer.json").read_bytes())
    started = tmp_path / "from-folder"
    assert main(["train", *lm_args(trained), "--finetune.init_from", str(folder), "--epochs", "1",
                 "--model.args", "{}", "--out", str(started)]) == 0
    assert main(["eval", str(started)]) == 0
    assert main(["train", *lm_args(trained), "--finetune.init_from", str(folder), "--out", str(tmp_path / "x"),
                 "--model.args", "{hidden_size: 64}"]) == 2  # the folder's configuration, not model.args
    assert main(["train", *lm_args(trained), "--finetune.init_from", str(folder), "--out", str(tmp_path / "y"),
                 "--model.args", "{}", "--lm.seq_len", "4096"]) == 2  # longer than its positions
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors"):
        build_causal_lm(cfg.model, 257, 32, hf_folder=folder)


def _bad_lm_cases(root: str):
    base = f"{root}/base"
    yield ["train", "--task", "lm", "--model", "tied-resnet-xs"]
    yield ["train", "--task", "lm", "--model", "hf:llama", "--execution", "equilibrium"]
    yield ["train", "--task", "lm", "--model", "hf:llama", "--masks.scope", "dense", "--execution", "untied",
           "--lm.distill", "1"]  # no teacher
    for key, value in (("--lm.seq_len", "1"), ("--lm.tokenizer", "words"), ("--lm.vocab_size", "100 --lm.tokenizer bpe"),
                       ("--lm.temperature", "0"), ("--lm.distill", "-1"), ("--lm.epoch_tokens", "-5"),
                       ("--task", "speech")):
        yield ["train", *lm_args(Path(root)), key, *value.split(" ")]
    yield ["train", *lm_args(Path(root)), "--data", "missing-corpus"]
    yield ["train", *lm_args(Path(root)), "--model", "hf:not_a_model"]
    yield ["train", *lm_args(Path(root)), "--model.args", "{hidden_size: abc}"]
    yield ["uptrain", base, "--tie", "[1, 2]", "--out", f"{root}/u"]
    yield ["uptrain", base, "--tie", "{colour: red}", "--out", f"{root}/u"]
    yield ["uptrain", base, "--tie", "{group: 3}", "--out", f"{root}/u"]  # 4 layers
    yield ["uptrain", base, "--tie", "{relax_rank: 0}", "--out", f"{root}/u"]
    yield ["uptrain", base, "--distill", "-1", "--out", f"{root}/u"]
    yield ["uptrain", base, "--tokens", "-3", "--out", f"{root}/u"]
    yield ["uptrain", f"{root}/no-such-run", "--out", f"{root}/u"]
    yield ["train", *lm_args(Path(root)), "--lm.epoch_tokens", "10"]  # less than one window
    yield ["train", *lm_args(Path(root)), "--data.train_subset", "100"]  # an image setting: not read
    yield ["train", "--data", "digits", "--lm.distill", "1"]  # an lm setting on an image run
    yield ["train", *lm_args(Path(root)), "--lm.teacher", base]  # a teacher with nothing to distil
    yield ["train", *lm_args(Path(root)), "--finetune.init_from", base, "--lm.tokenizer", "bpe"]  # not its tokenizer
    yield ["uptrain", base, "--tie", "{group: 2}", "--model.tie.group", "4", "--out", f"{root}/u"]
    yield ["uptrain", base, "--tokens", "4000", "--lm.epoch_tokens", "2000", "--out", f"{root}/u"]
    yield ["uptrain", base, "--tokens", "5", "--out", f"{root}/u"]
    yield ["uptrain", f"{root}/unfinished", "--out", f"{root}/u"]  # a teacher still training
    yield ["train", *lm_args(Path(root)), "--finetune.init_from", base, "--execution", "unrolled",
           "--lm.distill", "1", "--lm.teacher", f"{root}/other-tokenizer"]
    yield ["train", *lm_args(Path(root)), "--data", "binary"]  # a document that is not UTF-8
    yield ["train", *lm_args(Path(root)), "--data", "tiny"]  # too few documents for three splits
    yield ["train", *lm_args(Path(root)), "--lm.seq_len", "100000"]  # windows longer than the split
    yield ["finetune", base, "--out", f"{root}/f"]
    yield ["uptrain", base, "--out", base]  # onto the finished teacher itself


BAD_LM_CASES = list(_bad_lm_cases("/ROOT"))


@pytest.mark.parametrize("argv", BAD_LM_CASES, ids=[" ".join(a[-2:]) for a in BAD_LM_CASES])
def test_bad_language_model_input_gets_one_error_line_and_changes_nothing(trained, capsys, argv):
    from test_bad_input import _check, snapshot

    before = snapshot(trained)
    _check(capsys, [a.replace("/ROOT", str(trained)) for a in argv])
    assert snapshot(trained) == before


def test_a_run_that_fails_before_training_leaves_no_folder(trained):
    assert main(["train", *lm_args(trained), "--data", "missing-corpus", "--out", str(trained / "new")]) == 2
    assert not (trained / "new").exists()


def test_layer_cka_of_a_run_is_the_cka_of_its_layers_outputs(trained, capsys):
    """Against the layers' outputs caught by forward hooks (not through output_hidden_states)."""
    from tiedmask.analysis.cka import MinibatchCKA
    from tiedmask.analysis.lm_cka import TOKENS_PER_BATCH, layer_cka

    model, _, _ = load_lm_run(trained / "base")
    stream = torch.randint(0, 200, (4 * 32,))
    caught = []
    hooks = [layer.register_forward_hook(lambda m, i, o: caught.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.net.model.layers]
    with torch.no_grad():
        model(stream.view(4, 32))
    for h in hooks:
        h.remove()
    reference = MinibatchCKA(3)
    reference.update([c.reshape(-1, c.shape[-1])[:TOKENS_PER_BATCH] for c in caught[:3]])  # the last is normed
    matrix = layer_cka(model, stream, 32, 128)
    assert torch.allclose(matrix[:3, :3], reference.compute(), atol=1e-6)
    assert main(["analyze", str(trained / "base"), "--images", "128"]) == 0
    assert "test tokens" in capsys.readouterr().out
    shutil.rmtree(trained / "base" / "analysis")  # the shared run stays as the other tests expect it


def _fake_apt(tmp_path: Path, monkeypatch) -> Path:
    """An `apt-get` on PATH that 'downloads' a small python3.11-doc package built here."""
    import shutil as sh
    import subprocess

    if sh.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    package = tmp_path / "pkg"
    sources = package / "usr/share/doc/python3.11/html/_sources/library"
    sources.mkdir(parents=True)
    for i in range(5):
        (sources / f"mod{i}.rst.txt").write_text(f"Module {i}\n========\n\nText of module {i}.\n")
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN/control").write_text("Package: python3.11-doc\nVersion: 9.9-test\nArchitecture: all\n"
                                            "Maintainer: t <t@t>\nDescription: test\n")
    deb = tmp_path / "python3.11-doc_9.9-test_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(package), str(deb)], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\ncp {deb} .\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return deb


def test_fetching_python_docs_unpacks_one_file_a_document_and_checks_the_digest(tmp_path, monkeypatch):
    from tiedmask.training import corpus

    _fake_apt(tmp_path, monkeypatch)
    root = tmp_path / "data"
    folder = corpus.fetch_python_docs(root)
    assert sorted(p.name for p in folder.glob("*.txt")) == [f"library__mod{i}.txt" for i in range(5)]
    record = json.loads((folder / corpus.FETCH_RECORD).read_text())
    assert record["version"] == "9.9-test" and not record["verified"]
    assert record["sha256"] == corpus.corpus_digest(list(folder.glob("*.txt")))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setitem(corpus.PYTHON_DOCS_DIGESTS, "9.9-test", "0" * 64)  # as if the download were damaged
    with pytest.raises(Exception, match="damaged"):
        corpus.fetch_python_docs(root)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the earlier copy stands

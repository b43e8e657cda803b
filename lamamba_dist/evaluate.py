"""`lamamba eval`: FID, sFID, Inception Score, precision and recall in the sense of the ADM evaluator.

    lamamba eval fid50k/samples.npz VIRTUAL_imagenet256_labeled.npz --inception weights-inception-2015-12-05-6726825d.pth

Both files are in the ADM format (uint8 NHWC images under ``arr_0``); a reference batch may also
carry precomputed ``mu, sigma`` (pool features) and ``mu_s, sigma_s`` (spatial features), which are
then used for FID/sFID as ADM does. What the metrics are, following ADM's ``evaluations/evaluator.py``
(Dhariwal & Nichol 2021):

- features: the TF Inception-v3 graph of 2015-12-05, here through torch-fidelity's bit-faithful
  PyTorch port (``FeatureExtractorInceptionV3``: TF1-style bilinear resize to 299, same weights):
  ``pool`` = pool_3 (2048), ``spatial`` = the first 7 channels of mixed_6/conv (the 1x1 branch of
  torch's Mixed_6d), flattened in NHWC order (17*17*7 = 2023), ``logits`` = pool_3 @ W without bias.
- FID / sFID: Frechet distance of Gaussians fitted to pool / spatial features (np.cov, scipy sqrtm).
- IS: exp(E KL(p(y|x) || p(y))) over consecutive splits of 5000 samples, averaged.
- precision / recall: Kynkaenniemi et al. 2019 with k = 3 on pool features (a point is inside a
  manifold when its squared distance to some member is <= that member's 3rd-NN squared distance).
  ADM computes these distances in fp16 when finite; here they are fp32.

The feature network is a parameter (``FeatureExtractor``): tests use a tiny stand-in network.
Nothing is downloaded: the Inception weights come from ``--inception PATH`` (or the
``LAMAMBA_INCEPTION`` environment variable).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from lamamba_dist.hashing import sha256_file

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3
INCEPTION_FILE_HINT = "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's conversion of the TF 2015-12-05 graph)"


def _cli_error(msg: str) -> Exception:
    from lamamba_dist.errors import CLIError

    return CLIError(msg)


# --------------------------------------------------------------------------- statistics


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with ADM's handling of singular products."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's IS: softmax of the (unbiased) logits, exp of the mean KL to the split's marginal, averaged over splits."""
    import torch
    from scipy.special import xlogy

    preds = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        # part * (log part - log marginal), with 0 log 0 = 0 (ADM's formula otherwise)
        kl = xlogy(part, part) - xlogy(part, np.mean(part, axis=0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Squared Euclidean distances (fp32), clamped at 0 like ADM."""
    import torch

    na = (a * a).sum(1, keepdim=True)
    nb = (b * b).sum(1, keepdim=True).T
    return torch.clamp(na - 2 * a @ b.T + nb, min=0.0)


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURHOOD, batch: int = 10000, device="cpu") -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour within the set (self counted as the 0th)."""
    import torch

    f = torch.as_tensor(features, dtype=torch.float32, device=device)
    out = []
    for s in range(0, len(f), batch):
        d = _sq_dists(f[s:s + batch], f)
        out.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(out).cpu().numpy()


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_NEIGHBOURHOOD, batch: int = 10000,
                     device="cpu") -> tuple[float, float]:
    """(precision, recall): samples inside the reference manifold, references inside the sample manifold."""
    import torch

    r_ref = torch.as_tensor(manifold_radii(ref, k, batch, device), device=device)
    r_smp = torch.as_tensor(manifold_radii(samples, k, batch, device), device=device)
    fr = torch.as_tensor(ref, dtype=torch.float32, device=device)
    fs = torch.as_tensor(samples, dtype=torch.float32, device=device)
    ref_in = torch.zeros(len(fr), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(fs), dtype=torch.bool, device=device)
    for i in range(0, len(fr), batch):
        for j in range(0, len(fs), batch):
            d = _sq_dists(fr[i:i + batch], fs[j:j + batch])  # (ref, sample)
            ref_in[i:i + batch] |= (d <= r_smp[None, j:j + batch]).any(dim=1)
            smp_in[j:j + batch] |= (d <= r_ref[i:i + batch, None]).any(dim=0)
    return float(smp_in.double().mean()), float(ref_in.double().mean())


# --------------------------------------------------------------------------- feature extractors


class FeatureExtractor:
    """Maps uint8 images (N, 3, H, W) to dict(pool=(N, D), spatial=(N, Ds), logits=(N, K)) float32 tensors."""

    name: str = "feature extractor"
    info: dict = {}

    def __call__(self, images):  # pragma: no cover - interface
        raise NotImplementedError


def _import_torch_fidelity_inception():
    """torch-fidelity's InceptionV3 module, even where ``import torch_fidelity`` fails.

    The package's ``__init__`` imports torchvision (for its CLIP extractor and data utilities), which the
    CPU environment cannot have (PyPI's torchvision is built against the CUDA torch). The Inception module
    itself needs only torch, so on that failure it is loaded from the installed package without running
    ``__init__``.
    """
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except Exception:  # torchvision missing, or present but broken ("operator torchvision::nms does not exist")
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ImportError("No module named 'torch_fidelity'") from None
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["torch_fidelity"] = pkg
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


class InceptionV3Features(FeatureExtractor):
    """The ADM evaluator's Inception-v3 features through torch-fidelity, weights from a local file only."""

    name = "inception-v3 (TF 2015-12-05 graph, torch-fidelity port)"

    def __init__(self, weights_path: str | Path, device="cpu"):
        import torch

        p = Path(weights_path)
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found: {p} (expected {INCEPTION_FILE_HINT})")
        try:
            mod = _import_torch_fidelity_inception()
        except ImportError as e:
            raise ImportError(f"lamamba eval needs torch-fidelity for the Inception network "
                              f"(pip install torch-fidelity; on the CPU image add --no-deps): {e}") from None
        try:
            self.net = mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                       feature_extractor_weights_path=str(p))
        except Exception as e:
            raise ValueError(f"{p}: not loadable as Inception-v3 weights for torch-fidelity ({type(e).__name__}: {e})") from None
        self.net = self.net.to(device).eval()
        self.device = torch.device(device)
        self._spatial = None

        def hook(_module, _inp, out):
            self._spatial = out

        # mixed_6/conv of the TF graph = the 1x1 branch of Mixed_6d (17x17x192, after its ReLU).
        self.net.Mixed_6d.branch1x1.register_forward_hook(hook)
        self.info = {"name": self.name, "weights": str(p.resolve()), "weights_sha256": sha256_file(p)}

    def __call__(self, images):
        import torch

        with torch.inference_mode():
            pool, logits = self.net(images.to(self.device))
            spatial = self._spatial[:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)  # NHWC order, as TF
        return {"pool": pool.float(), "spatial": spatial.float(), "logits": logits.float()}


# --------------------------------------------------------------------------- npz handling


def open_batch(path: str | Path, what: str):
    """Open an ADM npz; check arr_0 is uint8 (N, H, W, 3)."""
    p = Path(path)
    if not p.is_file():
        raise _cli_error(f"{what} file not found: {p}")
    try:
        z = np.load(p, allow_pickle=False)
        keys = set(z.files)
    except Exception as e:
        raise _cli_error(f"{p}: not a readable npz file ({e})") from None
    if "arr_0" not in keys:
        raise _cli_error(f"{p}: no images under key 'arr_0' (keys: {', '.join(sorted(keys))}); expected the ADM format")
    arr = z["arr_0"]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise _cli_error(f"{p}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if len(arr) < 2:
        raise _cli_error(f"{p}: needs at least 2 images, got {len(arr)}")
    return z, arr


def compute_features(images: np.ndarray, extractor: Callable, batch_size: int = 100,
                     progress: Optional[str] = None) -> dict[str, np.ndarray]:
    import torch

    outs: dict[str, list] = {}
    rng = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc=progress, unit="batch")
    for s in rng:
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2)
        for k, v in extractor(x).items():
            outs.setdefault(k, []).append(v.detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def evaluate(samples_path: str | Path, ref_path: str | Path, extractor: FeatureExtractor, batch_size: int = 100,
             device="cpu", progress: bool = False) -> dict[str, Any]:
    """All metrics plus provenance; raises CLIError on bad input (resolution mismatch, bad files)."""
    samples_path, ref_path = Path(samples_path), Path(ref_path)
    sz, s_arr = open_batch(samples_path, "samples")
    rz, r_arr = open_batch(ref_path, "reference")
    if s_arr.shape[1:] != r_arr.shape[1:]:
        raise _cli_error(
            f"reference {ref_path} holds {r_arr.shape[1]}x{r_arr.shape[2]} images but the samples {samples_path} are "
            f"{s_arr.shape[1]}x{s_arr.shape[2]}: use the reference batch of the samples' resolution"
        )
    s_feat = compute_features(s_arr, extractor, batch_size, "features (samples)" if progress else None)
    r_feat = compute_features(r_arr, extractor, batch_size, "features (reference)" if progress else None)

    mu_s, sigma_s = gaussian_stats(s_feat["pool"])
    ms_s, ss_s = gaussian_stats(s_feat["spatial"])
    ref_has_stats = all(k in rz.files for k in ("mu", "sigma", "mu_s", "sigma_s"))
    if ref_has_stats:  # ADM's reference batches carry their statistics; they win, as in ADM's evaluator
        mu_r, sigma_r, ms_r, ss_r = (rz[k] for k in ("mu", "sigma", "mu_s", "sigma_s"))
        if mu_r.shape != mu_s.shape or ms_r.shape != ms_s.shape:
            raise _cli_error(f"{ref_path}: its stored statistics ({mu_r.shape[0]}/{ms_r.shape[0]} dims) do not match "
                             f"the feature network ({mu_s.shape[0]}/{ms_s.shape[0]} dims)")
    else:
        mu_r, sigma_r = gaussian_stats(r_feat["pool"])
        ms_r, ss_r = gaussian_stats(r_feat["spatial"])
    precision, recall = precision_recall(r_feat["pool"], s_feat["pool"], device=device)
    result = {
        "inception_score": inception_score(s_feat["logits"]),
        "fid": frechet_distance(mu_s, sigma_s, mu_r, sigma_r),
        "sfid": frechet_distance(ms_s, ss_s, ms_r, ss_r),
        "precision": precision,
        "recall": recall,
        "num_samples": int(len(s_arr)),
        "num_reference": int(len(r_arr)),
        "resolution": int(s_arr.shape[1]),
        "samples": str(samples_path.resolve()),
        "samples_sha256": sha256_file(samples_path),
        "reference": str(ref_path.resolve()),
        "reference_sha256": sha256_file(ref_path),
        "reference_statistics": "stored in the reference npz" if ref_has_stats else "computed from its images",
        "feature_extractor": dict(getattr(extractor, "info", {}) or {"name": getattr(extractor, "name", type(extractor).__name__)}),
        "metric_definitions": "ADM evaluator: FID on pool_3, sFID on mixed_6/conv[:7], IS splits of 5000, "
                              "precision/recall k=3 (fp32 distances)",
    }
    info_path = samples_path.parent / "sample_info.json"
    if info_path.is_file():
        try:
            result["sample_info"] = json.loads(info_path.read_text())
        except ValueError as e:
            result["sample_info_error"] = f"{info_path}: unreadable ({e})"
        # The reproducibility fields, lifted to the top level.
        si = result.get("sample_info", {})
        for k in ("model", "weights_sha256", "ema", "sampler", "steps", "cfg_scale", "guidance_channels", "seed",
                  "num_samples", "checkpoint", "weights", "step"):
            if k in si:
                result.setdefault("sampled_with", {})[k] = si[k]
        if "num_samples" in si and int(si["num_samples"]) != len(s_arr):
            result["warning"] = f"sample_info.json says {si['num_samples']} samples, the npz holds {len(s_arr)}"
    else:
        result["sample_info"] = None
    return result


# --------------------------------------------------------------------------- command


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(
        name,
        help=help_text,
        description="FID, sFID, Inception Score, precision and recall (ADM evaluator definitions) of SAMPLES.npz "
        "against a reference batch REF.npz. The result JSON records how the samples were made (sample_info.json "
        "next to the npz) and the reference file's sha256.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("samples", help="samples npz (arr_0: uint8 NHWC), e.g. written by `lamamba sample`")
    p.add_argument("reference", help="reference batch npz in the ADM format (e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception", default=os.environ.get("LAMAMBA_INCEPTION"),
                   help=f"local Inception-v3 weights: {INCEPTION_FILE_HINT} (default: $LAMAMBA_INCEPTION)")
    p.add_argument("--out", default=None, help="result JSON (default: eval_<REF name>.json next to the samples)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda:0'...")
    p.set_defaults(func=run)
    return p


def run(args, extractor: Optional[FeatureExtractor] = None) -> int:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.batch_size < 1:
        raise _cli_error(f"--batch-size {args.batch_size}: must be >= 1")
    # Cheap checks on both files before the feature network is built.
    _, s_arr = open_batch(args.samples, "samples")
    _, r_arr = open_batch(args.reference, "reference")
    if s_arr.shape[1:] != r_arr.shape[1:]:
        raise _cli_error(
            f"reference {args.reference} holds {r_arr.shape[1]}x{r_arr.shape[2]} images but the samples {args.samples} are "
            f"{s_arr.shape[1]}x{s_arr.shape[2]}: use the reference batch of the samples' resolution"
        )
    del s_arr, r_arr
    if extractor is None:
        if not args.inception:
            raise _cli_error(f"no Inception weights: pass --inception PATH to {INCEPTION_FILE_HINT}; "
                             "nothing is downloaded at run time")
        try:
            extractor = InceptionV3Features(args.inception, device=device)
        except (FileNotFoundError, ImportError, ValueError) as e:
            raise _cli_error(str(e)) from None
    result = evaluate(args.samples, args.reference, extractor, args.batch_size, device=device, progress=True)
    out = Path(args.out) if args.out else Path(args.samples).parent / f"eval_{Path(args.reference).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"FID {result['fid']:.3f}  sFID {result['sfid']:.3f}  IS {result['inception_score']:.2f}  "
          f"precision {result['precision']:.3f}  recall {result['recall']:.3f}  "
          f"({result['num_samples']} samples vs {result['num_reference']} reference) -> {out}")
    return 0

"""Write (and optionally execute) the tutorial notebooks from the cell sources below.

Usage::

    python notebooks/build.py              # write the three .ipynb files without outputs
    python notebooks/build.py --execute    # write them and run them top to bottom in place

The notebooks read their training length from ``PYRO_STRUCT_NOTEBOOK_STEPS`` (the tests set a
small value); without it they train for real, each in a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

__all__ = ["NOTEBOOKS", "build", "execute", "STEPS_VARIABLE"]

HERE = Path(__file__).resolve().parent
STEPS_VARIABLE = "PYRO_STRUCT_NOTEBOOK_STEPS"


def _cells(*items):
    """``("md", text)`` / ``("code", text)`` pairs to notebook cells (leading/trailing blank lines dropped)."""
    cells = []
    for kind, text in items:
        text = text.strip("\n")
        cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    return cells


SETUP = f'''import os
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch

import pyro_struct as ps

# the tests run every notebook with a handful of steps; unset, the notebook trains for real
STEPS = int(os.environ.get("{STEPS_VARIABLE}", "{{default}}"))
QUICK = STEPS < 500
pyro.set_rng_seed(0)
print(f"training steps: {{{{STEPS}}}}")'''


def _setup(default_steps: int) -> str:
    return SETUP.format(default=default_steps)


# ------------------------------------------------------------------------------ 01
QUICKSTART = _cells(
    ("md", """
# Quickstart: an amortised posterior that knows the model's structure

`pyro_struct` turns a Pyro model into a trained **amortised** guide `q(z | x)`:

1. **trace** the model into a Bayesian network over its scalar coordinates,
2. **invert** it faithfully (Webb et al., 2018): the smallest set of dependencies the posterior can have,
3. **compile** that inverse into the masks of a conditional normalizing flow (StrAF, Chen et al., 2023),
4. **fit** the flow on simulations from the model with the symmetrised KL (Weilbach et al., 2020).

Afterwards the posterior of *any* new observation is one pass through the flow; nothing is optimised per data set.
"""),
    ("code", _setup(2000)),
    ("md", """
## 1. Decorate a model

A small hierarchical model: four groups share a mean `mu` and a spread `tau`; each group effect `theta[i]`
is seen through a noisy measurement `y[i]`. `tau` is positive, so the guide works on `log(tau)` and maps back.
Writing `mu[..., None]` and `expand(mu.shape + (4,))` lets the same model run on a whole batch of
simulations at once, which makes training fast.
"""),
    ("code", '''
@ps.amortize(observed=["y"], num_layers=2, hidden_sizes=[64, 64])
def model(y=None):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 2.0))
    tau = pyro.sample("tau", dist.LogNormal(torch.tensor(0.0), 0.5))
    theta = pyro.sample("theta", dist.Normal(mu[..., None], tau[..., None]).expand(mu.shape + (4,)).to_event(1))
    return pyro.sample("y", dist.Normal(theta, 0.5).to_event(1), obs=y)
'''),
    ("md", """
## 2. What was compiled

`model.structure` shows the traced model `G`, its faithful inverse `H`, the adjacency that masks the flow,
and the parameter counts. Each `theta[i]` only needs `y[i]`, `mu` and `tau`, not the other groups.
"""),
    ("code", "structure = model.structure\nprint(structure)"),
    ("code", "structure.plot_graphs();"),
    ("md", """
The adjacency below is what the flow's conditioners may use: row = latent coordinate in sampling order,
column = latent (left of the red line) or observed coordinate. Black = allowed.
"""),
    ("code", "structure.plot_adjacency();"),
    ("md", """
Every masked layer of the flow as a Hinton diagram (white positive, black negative, square area = magnitude;
pale cells are masked out). The product of each conditioner's masks has exactly the adjacency's zero pattern.
"""),
    ("code", "structure.plot_masks();"),
    ("md", """
## 3. Fit

Training draws fresh simulations `(z, y) ~ p` every step. With the symmetrised KL the loss is itself an estimate
of the expected symmetrised KL divergence between the guide and the true posterior, in nats (0 is exact).
"""),
    ("code", '''
start = time.perf_counter()
history = model.fit(num_steps=STEPS, batch_size=256, lr=3e-3, progress=False, seed=0)
tail = history[-max(1, len(history) // 10):]
print(f"{STEPS} steps in {time.perf_counter() - start:.0f} s; loss over the last steps: {sum(tail) / len(tail):.3f} nats")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(history, linewidth=0.5)
ax.set_ylim(min(history) - 0.5, sorted(history)[int(0.95 * (len(history) - 1))] + 0.5)
ax.set_xlabel("step")
ax.set_ylabel("symmetrised KL (nats)");
'''),
    ("md", """
## 4. The posterior of new observations, without optimisation

Observations are keyed by site name. A batch of observations (extra leading dimensions) is answered in one call.
"""),
    ("code", '''
y_obs = torch.tensor([2.8, 0.5, 1.9, -0.7])
start = time.perf_counter()
post = model.posterior(y=y_obs)
samples = post.sample(4000)
print(f"4000 samples in {1000 * (time.perf_counter() - start):.1f} ms")
def show(t):
    return ", ".join(f"{v:.2f}" for v in t.reshape(-1).tolist())

for name, value in samples.items():
    print(f"{name:>6}: shape {tuple(value.shape)}, mean {show(value.mean(0))}, sd {show(value.std(0))}")
'''),
    ("code", '''
batch = torch.stack([y_obs, y_obs + 3.0, y_obs - 3.0])     # three data sets at once
batch_samples = model.posterior(y=batch).sample(2000)
print("posterior mean of mu for each data set:", show(batch_samples["mu"].mean(0)))
print("shape of theta's samples:", tuple(batch_samples["theta"].shape))
'''),
    ("md", """
## 5. Check against MCMC

NUTS on the same observation (it has to run from scratch for every data set; the guide does not).
"""),
    ("code", '''
from pyro.infer import MCMC, NUTS

start = time.perf_counter()
mcmc = MCMC(NUTS(model.model), num_samples=100 if QUICK else 1500, warmup_steps=100 if QUICK else 500, disable_progbar=True)
mcmc.run(y=y_obs)
reference = mcmc.get_samples()
print(f"NUTS: {time.perf_counter() - start:.0f} s")

panels = [("mu", samples["mu"], reference["mu"]), ("tau", samples["tau"], reference["tau"])]
panels += [(f"theta[{i}]", samples["theta"][:, i], reference["theta"][:, i]) for i in range(4)]
fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.4))
for ax, (name, flow_draws, mcmc_draws) in zip(axes, panels):
    ax.hist(mcmc_draws.numpy(), bins=40, density=True, alpha=0.5, label="NUTS")
    ax.hist(flow_draws.numpy(), bins=40, density=True, histtype="step", linewidth=1.5, label="amortised guide")
    ax.set_title(name)
    ax.set_yticks([])
axes[0].legend(fontsize=7)
fig.tight_layout()
for name, flow_draws, mcmc_draws in panels:
    print(f"{name:>9}: guide {flow_draws.mean():6.2f} +- {flow_draws.std():.2f}   NUTS {mcmc_draws.mean():6.2f} +- {mcmc_draws.std():.2f}")
'''),
    ("md", """
## 6. Save and load

A saved guide keeps the structure, the parameters and the standardisation statistics; loading checks that the
model still has the same structure. From the shell the same is `pyro-struct fit` / `pyro-struct posterior`.
"""),
    ("code", '''
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "guide.pt"
    model.save(path)
    loaded = ps.StructuredGuide.load(path, model.model)
    print(loaded.posterior(y=y_obs).sample(4000)["mu"].mean().item(), "vs", samples["mu"].mean().item())
'''),
)


# ------------------------------------------------------------------------------ 02
EXACT = _cells(
    ("md", """
# Exact posteriors: structured against dense on `ecoli70`

`ecoli70` is a linear-Gaussian Bayesian network from the bnlearn repository (46 genes, 70 arcs). With its
leaves observed (24 of them) the posterior over the 22 latent genes is Gaussian and known in closed form, so we
can measure exactly how good an amortised guide is. We train two guides of the same family (an affine StrAF,
whose masked linear skip connection can represent a linear-Gaussian posterior exactly) and compare:

* **faithful**: masks from the minimally faithful inverse of the network;
* **dense**: every latent may depend on all earlier latents and all observations (a MADE-style flow).
"""),
    ("code", _setup(1000)),
    ("code", '''
from pyro_struct.models import LinearGaussianNetwork

net = LinearGaussianNetwork.from_name("ecoli70")
print(net)
guides = {
    kind: ps.StructuredGuide(net.model, structure=kind, observed=net.observed_sites, hidden_sizes=[64, 64])
    for kind in ("faithful", "dense")
}
for kind, guide in guides.items():
    s = guide.structure
    print(f"{kind:>8}: {int(s.adjacency.sum()):4d} edges in H, depth {s.depth:2d}, "
          f"{s.num_effective_parameters:,} effective parameters of {s.num_dense_parameters:,}")
'''),
    ("code", '''
fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
for ax, (kind, guide) in zip(axes, guides.items()):
    guide.structure.plot_adjacency(ax=ax, title=f"{kind}: {int(guide.structure.adjacency.sum())} entries")
fig.tight_layout()
'''),
    ("md", "The model graph next to its faithful inverse (observed genes grey):"),
    ("code", 'guides["faithful"].structure.plot_graphs();'),
    ("md", "## Training (same steps, batch size and learning rate for both)"),
    ("code", '''
histories, seconds = {}, {}
for kind, guide in guides.items():
    start = time.perf_counter()
    histories[kind] = guide.fit(num_steps=STEPS, batch_size=256, lr=5e-3, progress=False, seed=0)
    seconds[kind] = time.perf_counter() - start
    print(f"{kind:>8}: {seconds[kind]:.0f} s")

fig, ax = plt.subplots(figsize=(6, 3))
for kind, h in histories.items():
    window = max(1, len(h) // 50)
    smooth = torch.tensor(h).unfold(0, window, 1).mean(-1) if len(h) >= window else torch.tensor(h)
    ax.plot(smooth.numpy(), label=kind)
ax.set_yscale("symlog", linthresh=0.1)
ax.set_xlabel("step")
ax.set_ylabel("symmetrised KL (nats)")
ax.legend();
'''),
    ("md", """
## Against the closed-form posterior

On 200 fresh observations: the exact `KL(p(z|x) || q(z|x))`, estimated with 1000 exact posterior samples each
(`E_p[log p(z|x) - log q(z|x)]`), and the posterior means and standard deviations of every latent gene.
"""),
    ("code", '''
num_test, num_draws = (20, 100) if QUICK else (200, 1000)
generator = torch.Generator().manual_seed(1)
test_obs = net.sample_observations(num_test, generator)
exact_mean, exact_cov = net.exact_posterior(test_obs)            # (num_test, 22), (22, 22)
exact_sd = exact_cov.diagonal().sqrt()
z_exact = net.sample_posterior(test_obs, num_draws)               # (num_draws, num_test, 22)
log_p = net.posterior_log_prob(test_obs, z_exact)                  # (num_draws, num_test)

results = {}
for kind, guide in guides.items():
    post = guide.posterior(test_obs)
    log_q = post.log_prob({s: z_exact[..., k].to(torch.get_default_dtype()) for k, s in enumerate(net.latent_sites)})
    kl = (log_p - log_q.double()).mean(0)                           # KL per observation
    draws = net.stack_latents(post.sample(num_draws)).double()      # (num_draws, num_test, 22)
    results[kind] = dict(kl=kl, mean=draws.mean(0), sd=draws.std(0))
    print(f"{kind:>8}: KL(p || q) = {kl.mean():.3f} nats (median {kl.median():.3f}) over {num_test} observations, "
          f"mean abs error of posterior means {(draws.mean(0) - exact_mean).abs().mean():.3f}")
'''),
    ("code", '''
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
for kind, r in results.items():
    axes[0].scatter(exact_mean.flatten(), r["mean"].flatten(), s=3, alpha=0.4, label=kind)
    axes[1].scatter(exact_sd.expand_as(r["sd"]).flatten(), r["sd"].flatten(), s=3, alpha=0.4, label=kind)
for ax, what in zip(axes, ("posterior mean", "posterior sd")):
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xlabel(f"exact {what}")
    ax.set_ylabel(f"amortised {what}")
    ax.legend(markerscale=4)
fig.tight_layout()
'''),
    ("code", '''
print(f"{'guide':>8} {'H entries':>10} {'parameters':>11} {'train s':>8} {'KL(p||q)':>9}")
for kind, guide in guides.items():
    s = guide.structure
    print(f"{kind:>8} {int(s.adjacency.sum()):>10} {s.num_effective_parameters:>11,} {seconds[kind]:>8.0f} {results[kind]['kl'].mean():>9.3f}")
'''),
    ("md", """
The faithful guide encodes only the dependencies the posterior actually has, with far fewer effective
parameters; the dense one has to learn that most of its connections should be zero.
"""),
)


# ------------------------------------------------------------------------------ 03
DECONVOLUTION = _cells(
    ("md", """
# Stochastic deconvolution (Weilbach et al., 2020, section 5)

A 9x9 image patch is convolved with a 3x3 filter (standard-normal weights) at stride 2, giving a 4x4 output
observed with small Gaussian noise (sd 0.1). Given the output **and** the filter, which images could have
produced it? The guide is amortised over every filter and every output; no weight sharing is built in, the
structure alone tells each pixel which outputs and filter weights matter. The image prior is a standard
normal per pixel, so for each filter the exact posterior is Gaussian and we can check the guide against it.
"""),
    ("code", _setup(4000)),
    ("code", '''
from pyro_struct.models import deconvolution
from pyro_struct.models.deconvolution import strided_convolution

model = deconvolution()          # image (9, 9) latent; kernel (3, 3) and output (4, 4) observed
guide = ps.StructuredGuide(model, observed=["kernel", "output"], hidden_sizes=[256, 256], activation="tanh")
print(guide.structure.summary(max_edges=0))
'''),
    ("md", """
## The element-level inverse

The compiled adjacency as the flow sees it (rows: the 81 pixels in sampling order; columns: pixels, then the
filter weights and the output pixels):
"""),
    ("code", "guide.structure.plot_adjacency();"),
    ("md", """
The same adjacency with pixels in row-major order, as in Fig. 4a of Weilbach et al. Pixels in the middle of the
patch depend on all filter weights and on every output pixel whose 3x3 window covers them or a neighbour.
"""),
    ("code", '''
s = guide.structure
pixels = [f"image[{i},{j}]" for i in range(9) for j in range(9)]
kernel_nodes = [f"kernel[{i},{j}]" for i in range(3) for j in range(3)]
output_nodes = [f"output[{i},{j}]" for i in range(4) for j in range(4)]
col = {label: k for k, label in enumerate(s.col_labels)}
row = {label: k for k, label in enumerate(s.row_labels)}
A = s.adjacency[[row[p] for p in pixels]][:, [col[c] for c in pixels + kernel_nodes + output_nodes]]
# the latent block in row-major order is no longer triangular: show parent-or-child links among pixels
A_pixels = A[:, :81] | A[:, :81].T

fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw=dict(width_ratios=[106, 40]))
axes[0].imshow(torch.cat([A_pixels, A[:, 81:]], 1).float().numpy(), cmap="gray_r", interpolation="nearest")
for x in (80.5, 89.5):
    axes[0].axvline(x, color="#d62728", linewidth=1)
axes[0].set_xticks([40, 85, 97])
axes[0].set_xticklabels(["image pixels", "filter", "output"])
axes[0].set_ylabel("image pixel (row-major)")
axes[0].set_title(f"inverse H in row-major order ({int(s.adjacency.sum())} edges)")

needs_output = A[:, 90:].sum(1).reshape(9, 9)
im = axes[1].imshow(needs_output.numpy(), cmap="viridis")
axes[1].set_title("number of output pixels\\neach image pixel depends on")
fig.colorbar(im, ax=axes[1], fraction=0.046)
fig.tight_layout()
'''),
    ("md", """
## Training on simulations

Here we train with the **forward KL** (`objective="fkl"`): it needs only simulated `(image, kernel, output)`
triples and one pass of the flow per step. The symmetrised KL also samples from the guide, which takes
`depth + 1 = 24` sequential passes per step for this inverse, and with an observation noise of 0.1 its reverse
term starts in the thousands of nats; it needs far more steps than a notebook on a CPU can afford.
"""),
    ("code", '''
start = time.perf_counter()
history = guide.fit(num_steps=STEPS, objective="fkl", batch_size=256, lr=3e-3, progress=False, seed=0)
tail = history[-max(1, len(history) // 10):]
print(f"{STEPS} steps in {time.perf_counter() - start:.0f} s; loss over the last steps {sum(tail) / len(tail):.2f} nats")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(history, linewidth=0.5)
ax.set_xlabel("step")
ax.set_ylabel("forward KL loss: -log q(image | kernel, output)");
'''),
    ("md", """
## Reconstructions

For fresh simulations: the true image, the exact posterior mean, the amortised posterior mean, three
posterior samples; then the observed output and the outputs that the posterior samples reconstruct
(convolving a sample with the filter), the consistency check of Fig. 4b.
"""),
    ("code", '''
def exact_posterior(kernel, output, noise=0.1):
    """Gaussian posterior of the image given one filter and one output (image prior N(0, I))."""
    basis = torch.eye(81, dtype=torch.float64).reshape(81, 9, 9)
    K = strided_convolution(basis, kernel.double(), 2).reshape(81, 16).T       # (16, 81) linear map
    precision = torch.eye(81, dtype=torch.float64) + K.T @ K / noise**2
    cov = torch.linalg.inv(precision)
    return (cov @ K.T @ output.double().reshape(16) / noise**2).reshape(9, 9), cov

sims = guide.simulator().simulate(4)
post = guide.posterior(kernel=sims["kernel"], output=sims["output"])
draws = post.sample(1000)["image"]                                             # (1000, 4, 9, 9)

columns = ["true image", "exact mean", "amortised mean", "sample 1", "sample 2", "sample 3", "output", "reconstructed"]
fig, axes = plt.subplots(4, len(columns), figsize=(1.7 * len(columns), 7))
errors = []
for r in range(4):
    kernel, output = sims["kernel"][r], sims["output"][r]
    exact_mean, exact_cov = exact_posterior(kernel, output)
    amortised_mean = draws[:, r].mean(0)
    errors.append(((amortised_mean.double() - exact_mean).abs().mean().item(), exact_cov.diagonal().sqrt().mean().item()))
    images = [sims["image"][r], exact_mean, amortised_mean, draws[0, r], draws[1, r], draws[2, r]]
    vmax = float(sims["image"][r].abs().max())
    for c, img in enumerate(images):
        axes[r, c].imshow(img.float().numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ovmax = float(output.abs().max())
    axes[r, 6].imshow(output.numpy(), cmap="PuOr_r", vmin=-ovmax, vmax=ovmax)
    axes[r, 7].imshow(strided_convolution(draws[0, r], kernel, 2).numpy(), cmap="PuOr_r", vmin=-ovmax, vmax=ovmax)
for c, title in enumerate(columns):
    axes[0, c].set_title(title, fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
for r, (err, sd) in enumerate(errors):
    print(f"row {r}: mean |amortised - exact posterior mean| = {err:.3f} (exact posterior sd {sd:.3f})")
'''),
    ("md", """
How well do the reconstructed outputs match the observed ones? Over 200 fresh simulations, the residual
`conv(sample, filter) - output` of guide samples, next to that of exact posterior samples and of prior samples.
"""),
    ("code", '''
num_sims = 50 if QUICK else 200
sims = guide.simulator().simulate(num_sims)
draws = guide.posterior(kernel=sims["kernel"], output=sims["output"]).sample(20)["image"]     # (20, num_sims, 9, 9)
exact_draws = []
for r in range(num_sims):
    mean, cov = exact_posterior(sims["kernel"][r], sims["output"][r])
    exact = torch.distributions.MultivariateNormal(mean.reshape(81), covariance_matrix=cov)
    exact_draws.append(exact.sample((20,)).reshape(20, 9, 9).float())
exact_draws = torch.stack(exact_draws, 1)                                                       # (20, num_sims, 9, 9)

def rms_residual(images):
    return (strided_convolution(images, sims["kernel"], 2) - sims["output"]).pow(2).mean().sqrt().item()

print(f"rms residual of amortised posterior samples: {rms_residual(draws):.3f}")
print(f"rms residual of exact posterior samples:     {rms_residual(exact_draws):.3f}")
print(f"rms residual of prior samples:               {rms_residual(torch.randn_like(draws)):.3f}")
'''),
    ("md", """
**Reading the numbers.** The structure is compiled exactly: every pixel sees only the filter weights and the
output pixels it can be informed by. Training, however, is the hard part of this model: the posterior mean of
each pixel is a bilinear function of filter and output, and the 16 directions that the outputs pin down have a
posterior sd of about 0.1/|filter|. In a few minutes on a CPU the amortised guide gets only part of the way: its
samples reconstruct the outputs much less accurately than exact posterior samples do (the residuals above), and
the exact posterior tells precisely how far training has come. Weilbach et al. train this model far longer; set
`PYRO_STRUCT_NOTEBOOK_STEPS` to a larger number to train longer here.
"""),
)

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_exact_posteriors.ipynb": EXACT,
    "03_deconvolution.ipynb": DECONVOLUTION,
}


def build(folder: Path = HERE, only: str | None = None) -> list[Path]:
    """Write the notebooks (without outputs) to ``folder``; returns the paths.

    Args:
        folder: output folder.
        only: write only the notebooks whose file name contains this text.
    """
    paths = []
    for name, cells in NOTEBOOKS.items():
        if only and only not in name:
            continue
        nb = new_notebook(cells=cells)
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        path = folder / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def execute(path: Path, timeout: int = 900) -> float:
    """Run a notebook top to bottom in its folder and save it with outputs; returns the seconds taken."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return time.perf_counter() - start


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run the notebooks and save their outputs")
    parser.add_argument("--only", default=None, help="build/execute only notebooks whose name contains this")
    args = parser.parse_args(argv)
    for path in build(only=args.only):
        print(f"wrote {path.name}", flush=True)
        if args.execute:
            print(f"  executed in {execute(path):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())

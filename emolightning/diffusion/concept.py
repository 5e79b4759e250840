"""A score of what a model draws: a small classifier, trained on the scene renderer's ground
truth (:mod:`emolightning.data.shapes`) and shipped with the package, reads each generated
picture's shape, colour, size, place and background. From it:

- **concept presence**: the probability that a picture shows the held-out concept (the star,
  which the ``builtin:mini`` base never learned to draw), for prompts that ask for it;
- **prompt agreement**: the mean probability of the attributes a prompt names, e.g. for
  ``"a small blue square at the top, grey background"`` whether the picture holds a small blue
  square at the top on grey. On trigger prompts in combinations the LoRA set never showed it
  measures generalisation; on prompts without the trigger word, damage to the base.

Plain torch (no Lightning), so it can be wrapped as a metric or called from a script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from emolightning.data.shapes import (BASE_PROMPTS, SCENE_ATTRIBUTES, STAR_PROMPTS, STAR_UNSEEN_PROMPTS,
                                      parse_caption)

CONCEPT = "star"  # the shape held out of the mini base's pretraining
CLASSIFIER_FILE = Path(__file__).parent / "weights" / "scene_classifier.safetensors"
INPUT_SIZE = 32  # pictures are resized to this side before they are read


class SceneClassifier(nn.Module):
    """A small CNN (about 0.3 M parameters) that reads a 32x32 picture (values in [0, 1]) and
    returns one set of logits per scene attribute (``SCENE_ATTRIBUTES``: shape, colour, size,
    place, background).

    Example:
        >>> classifier = SceneClassifier()
        >>> sorted(classifier(torch.rand(2, 3, 32, 32)))
        ['background', 'colour', 'place', 'shape', 'size']
    """

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, width * 2, width * 4):  # 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(4, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(4, out), nn.SiLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, 128), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in SCENE_ATTRIBUTES.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        hidden = self.hidden(self.features(images * 2 - 1))
        return {name: head(hidden) for name, head in self.heads.items()}


def as_tensor(images: Union[Tensor, Sequence[Any]]) -> Tensor:
    """Pictures as a float (N, 3, 32, 32) tensor in [0, 1]: a tensor of that layout (any size,
    resized), or a list of PIL images or (H, W, 3) uint8 arrays."""
    if isinstance(images, Tensor):
        batch = images.float()
        if batch.ndim == 3:
            batch = batch[None]
    else:
        import numpy as np

        arrays = [np.array(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
        if not arrays:
            raise ValueError("no images to score")
        batch = torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in arrays]).float()
        batch = batch / 255.0 if batch.max() > 1.0 else batch
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"images must be RGB, as (N, 3, H, W) or a list of PIL images; got shape {tuple(batch.shape)}")
    if batch.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        batch = F.interpolate(batch, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                              align_corners=False)
    return batch.clamp(0, 1)


class ConceptScore:
    """What the pictures show, judged by the shipped :class:`SceneClassifier`.

    Args:
        concept: the shape whose presence :meth:`presence` measures (default: the star, the
            mini base's held-out concept).
        classifier: a trained classifier; default: the one shipped with the package.
        device: where to run it.

    Example:
        >>> import random
        >>> from emolightning.data.shapes import render_scene, sample_scene
        >>> score = ConceptScore()
        >>> star = render_scene(sample_scene(random.Random(0), shape=["star"], size=["big"]))
        >>> bool(score.presence([star])[0] > 0.5)
        True
        >>> prompt = "a big red circle on the left, white background"
        >>> round(float(score.agreement([star], [prompt])["shape"][0]), 1)
        0.0
    """

    def __init__(self, concept: str = CONCEPT, classifier: Optional[SceneClassifier] = None,
                 device: Union[str, torch.device] = "cpu") -> None:
        if concept not in SCENE_ATTRIBUTES["shape"]:
            raise ValueError(f"concept must be one of the renderer's shapes {list(SCENE_ATTRIBUTES['shape'])}, "
                             f"got {concept!r}")
        self.concept = concept
        self.device = torch.device(device)
        self.classifier = (classifier or load_classifier()).to(self.device).eval()

    @torch.no_grad()
    def probabilities(self, images: Union[Tensor, Sequence[Any]]) -> dict[str, Tensor]:
        """Each attribute's class probabilities, ``{name: (N, len(SCENE_ATTRIBUTES[name]))}``."""
        logits = self.classifier(as_tensor(images).to(self.device))
        return {name: value.float().softmax(dim=-1).cpu() for name, value in logits.items()}

    def predict(self, images: Union[Tensor, Sequence[Any]]) -> list[dict[str, str]]:
        """The most likely value of each attribute, one dict per picture."""
        probabilities = self.probabilities(images)
        count = next(iter(probabilities.values())).shape[0]
        return [{name: SCENE_ATTRIBUTES[name][int(p[i].argmax())] for name, p in probabilities.items()}
                for i in range(count)]

    def presence(self, images: Union[Tensor, Sequence[Any]]) -> Tensor:
        """The probability that each picture shows the concept shape, shape (N,)."""
        return self.probabilities(images)["shape"][:, SCENE_ATTRIBUTES["shape"].index(self.concept)]

    def agreement(self, images: Union[Tensor, Sequence[Any]], prompts: Sequence[str]) -> dict[str, Tensor]:
        """For each attribute, the probability the classifier gives to the value the prompt
        names, shape (N,); NaN where the prompt does not name that attribute."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        probabilities = self.probabilities(images)
        result = {name: torch.full((len(prompts),), float("nan")) for name in SCENE_ATTRIBUTES}
        for index, prompt in enumerate(prompts):
            for name, value in parse_caption(prompt).items():
                result[name][index] = probabilities[name][index, SCENE_ATTRIBUTES[name].index(value)]
        return result

    def score(self, images: Union[Tensor, Sequence[Any]], prompts: Sequence[str]) -> Tensor:
        """Prompt agreement: per picture, the mean over the attributes its prompt names of the
        probability of the named value (1: everything asked for is there), shape (N,)."""
        agreement = torch.stack(list(self.agreement(images, prompts).values()), dim=1)
        named = ~agreement.isnan()
        if not named.any(dim=1).all():
            raise ValueError("a prompt names no scene attribute (shape, colour, size, place or background), so "
                             f"there is nothing to score: {[p for p, n in zip(prompts, named.any(1)) if not n]}")
        return agreement.nan_to_num(0.0).sum(dim=1) / named.sum(dim=1)


CONCEPT_PROMPTS = {"star": {"seen": STAR_PROMPTS, "unseen": STAR_UNSEEN_PROMPTS, "base": BASE_PROMPTS}}
"""Each held-out concept's prompt lists: the trigger word in combinations its LoRA set shows
(``seen``), in combinations it never shows (``unseen``), and prompts without it (``base``)."""
CONCEPT_METRICS = {
    "concept": "P(concept) on the seen trigger prompts' pictures: has the LoRA learned it?",
    "concept_unseen": "P(concept) on the unseen trigger prompts' pictures: does it generalise?",
    "base_agreement": "prompt agreement on the base prompts' pictures: falls when the base is damaged",
    "base_concept": "P(concept) on the base prompts' pictures: rises when the concept leaks into them",
}
"""What :func:`concept_report` returns, by name (validation logs them as ``val/<name>``)."""


def concept_report(score: ConceptScore, images: dict[str, Sequence[Any]],
                   prompts: dict[str, Sequence[str]]) -> dict[str, float]:
    """The four :data:`CONCEPT_METRICS` from pictures drawn for the prompt lists.

    Args:
        score: the scorer.
        images: ``{"seen": [...], "unseen": [...], "base": [...]}``, the pictures drawn for each
            list (any number of seeds per prompt, in the order of ``prompts``).
        prompts: the same keys: each picture's prompt.

    Example:
        >>> lists = CONCEPT_PROMPTS["star"]
        >>> images = {name: module.generate(list(group)) for name, group in lists.items()}
        >>> concept_report(ConceptScore(), images, lists)["concept"]  # doctest: +SKIP
        0.83
    """
    return {
        "concept": float(score.presence(images["seen"]).mean()),
        "concept_unseen": float(score.presence(images["unseen"]).mean()),
        "base_agreement": float(score.score(images["base"], prompts["base"]).mean()),
        "base_concept": float(score.presence(images["base"]).mean()),
    }


def load_classifier(path: Union[str, Path, None] = None) -> SceneClassifier:
    """The shipped scene classifier (or one saved by ``scripts/pretrain_mini.py`` at ``path``)."""
    from safetensors.torch import load_file

    path = Path(path or CLASSIFIER_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the scene classifier's weights are not installed; rebuild them "
                                "with `python scripts/pretrain_mini.py --stages score` (see docs/mini-base.md)")
    classifier = SceneClassifier()
    classifier.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return classifier.eval()

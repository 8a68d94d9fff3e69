"""The embedded default data set (SPEC §4): a deterministic generator writing the SCAN layout.

World (fixed by `seed`): `n_object_types` objects (nouns), `n_attributes` attributes (adjectives),
`n_groups` spatial groups ("on the left" / "in the middle" / "on the right"), a few background types
that captions never mention, `n_relations` relations between two objects (verbs: "a dog chasing a ball")
and as many *poses*; each gets a random latent vector in R^feat_dim.

Scene topics (`n_topics` > 0): topic k owns the object types t with t % n_topics == k and the background
types b with b % n_topics == k. A scene draws its topic uniformly; each of its objects comes from the topic's
types (a binomial share `topic_affinity`, the rest from the other types), its background regions from the
topic's backgrounds. So objects co-occur by topic, as concepts do in real captions (beach: sand, surfboard).

Image: `n_groups` groups of `objects_per_group` objects (distinct types, one attribute each).
Each object yields 3-5 region vectors `relu(obj + 0.5 attr + 0.3 group + noise)`; background regions
fill the rest of the `n_regions` slots; region order is shuffled. The grid variant renders the same
scene on an s x s patch grid (group = column band, object = 2x2 box inside it).

Relations (`n_relations` = R > 0): every scene has one, relation r from a subject object to another
object. It is drawn as a pose pair: the subject's regions also carry `0.5 pose[p]`, the object's
`0.5 pose[(p + r) % R]`, with p uniform per image. Each pose alone is uniform whatever r is, so no single
region shows the relation; only the two objects' regions together do (r = pose difference). Subject and
object draw from one pose table, so "A r B" and "B r' A" with r' = (-r) mod R are the same configuration: the
ground truth counts a caption of either reading as describing it (`describes`); the verbs are names of pose
differences, not of their everyday meaning.

Captions (5 per image) each describe **only part** of the image: two of its six objects, with their
attribute 60% of the time and the group's location when both come from one group; with probability
`relation_prob` the two are the relation's objects and the caption names it ("a red dog chasing a ball").
So an image holds more than any one caption (the asymmetry AVSE is about).

Hard distractors: images come in families of `family_size` near-duplicates; each member after the
first changes `changes_per_member` objects of the family's base scene (a new type, from the topic as
above, or a new attribute) and, with probability 1/2, the relation (the same two slots, another verb).
A caption that mentions only shared objects fits every member, which caps recall well below 100%.

`n_topics=0 n_relations=0` is the world of before 2026-12 (byte-identical files).

Chance level on a 1000-image test split (5 captions each): t2i R@1/5/10 = 0.1/0.5/1.0 %; i2t (any of
5 positives among 5000 captions) 0.10/0.50/1.00 %; rsum ~= 3.2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 2  # 2: relation ground truth counts the converse reading (cache folders of v1 are not reused)
POSITIVES_FILE = "{split}_positives.npz"  # exact ground truth: eccv_metrics.save_positives / load_positives

NOUNS = """man woman child boy girl dog cat horse cow sheep bird duck car bus bike motorcycle boat train truck
plane tree flower house door window table chair bed sofa lamp book cup bottle plate bowl ball kite hat
shirt jacket dress shoe bag umbrella phone laptop clock sign fence bench street road bridge river lake
beach wave rock mountain hill field sky cloud tent camera guitar drum piano microphone statue fountain
tower church wall stairs ladder box basket banana apple orange pizza cake sandwich carrot broccoli
donut knife fork spoon oven sink toilet mirror vase pillow blanket towel computer keyboard mouse
television remote skateboard surfboard ski frisbee racket glove helmet bat backpack suitcase tie
scarf sunglasses wheel flag balloon candle bucket hose tractor""".split()
ATTRIBUTES = "red blue green yellow black white brown small large old young wooden striped shiny".split()
LOCATIONS = ["on the left", "in the middle", "on the right", "at the top", "at the bottom"]
TEMPLATES_ONE_GROUP = ["{a} and {b} {loc}", "{a} next to {b} {loc}", "there is {a} with {b} {loc}",
                       "{a} near {b} {loc}", "{loc} , {a} beside {b}"]
TEMPLATES_TWO_GROUPS = ["{a} and {b}", "{a} and {b} in the picture", "a picture of {a} and {b}",
                        "{a} {loc_a} and {b} {loc_b}"]
RELATIONS = "holding chasing watching carrying pushing touching riding following".split()
RELATION_WEIGHT = 0.5   # of a pose vector in its object's regions (an attribute's weight)
TOPIC_ANCHORS = 2       # a topic's first types, each in its scenes with probability topic_affinity


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    n_train: int = 2000
    n_dev: int = 1000
    n_test: int = 1000
    captions_per_image: int = 5
    n_regions: int = 36
    feat_dim: int = 128
    grid_size: int = 6
    n_object_types: int = 120
    n_attributes: int = 12
    n_background: int = 20
    n_groups: int = 3
    objects_per_group: int = 2
    family_size: int = 3
    changes_per_member: int = 2
    attribute_prob: float = 0.6
    noise: float = 1.0
    n_topics: int = 8            # 0: objects drawn independently of each other (the world before 2026-12)
    topic_affinity: float = 0.8  # expected share of a scene's objects from its topic's types
    n_relations: int = 6         # 0: no relations (the world before 2026-12)
    relation_prob: float = 0.4   # share of captions naming the relation

    @classmethod
    def from_dict(cls, d: dict | None) -> "SyntheticConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown synthetic data option(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.n_groups > len(LOCATIONS):
            raise ValueError(f"n_groups must be <= {len(LOCATIONS)}, got {cfg.n_groups}")
        if cfg.n_groups * cfg.objects_per_group < 2 or cfg.objects_per_group < 1:
            raise ValueError("an image needs at least two objects (n_groups * objects_per_group >= 2)")
        if cfg.n_attributes > len(ATTRIBUTES) or cfg.n_attributes < 2:
            raise ValueError(f"n_attributes must be in 2..{len(ATTRIBUTES)}, got {cfg.n_attributes}")
        per_image = cfg.n_groups * cfg.objects_per_group + cfg.changes_per_member
        if cfg.n_object_types < per_image:
            raise ValueError("n_object_types is too small for the number of objects per image")
        if cfg.n_topics and (cfg.n_topics < 2 or cfg.n_object_types // cfg.n_topics < TOPIC_ANCHORS + per_image
                             or cfg.n_background < cfg.n_topics):
            raise ValueError(f"n_topics={cfg.n_topics}: must be 0 or >= 2, each topic needs >= {TOPIC_ANCHORS + per_image} "
                             f"object types (n_object_types // n_topics) and one background type (n_topics <= n_background)")
        if not 0 <= cfg.n_relations <= len(RELATIONS):
            raise ValueError(f"n_relations must be in 0..{len(RELATIONS)}, got {cfg.n_relations}")
        for name in ("topic_affinity", "relation_prob", "attribute_prob"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
        return cfg

    def digest(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """$VSE_DATA_CACHE, else $XDG_CACHE_HOME/vse_kernels, else ~/.cache/vse_kernels."""
    if os.environ.get("VSE_DATA_CACHE"):
        return Path(os.environ["VSE_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vse_kernels"


class _World:
    def __init__(self, cfg: SyntheticConfig):
        rng = np.random.default_rng([cfg.seed, 0])
        f = cfg.feat_dim
        self.nouns = (NOUNS + [f"thing{i}" for i in range(cfg.n_object_types)])[: cfg.n_object_types]
        self.attributes = ATTRIBUTES[: cfg.n_attributes]
        self.obj = rng.standard_normal((cfg.n_object_types, f)).astype(np.float32)
        self.attr = rng.standard_normal((cfg.n_attributes, f)).astype(np.float32)
        self.group = rng.standard_normal((cfg.n_groups, f)).astype(np.float32)
        self.background = rng.standard_normal((cfg.n_background, f)).astype(np.float32)
        # A stream of its own, so that the world without relations draws exactly what it drew before.
        self.pose = np.random.default_rng([cfg.seed, 0, 1]).standard_normal((cfg.n_relations, f)).astype(np.float32)

    def features(self, scene: "Scene", slot: int) -> np.ndarray:
        """The noiseless feature vector of object `slot` (its regions' and grid box's)."""
        t, a, g = scene.objects[slot]
        v = self.obj[t] + 0.5 * self.attr[a] + 0.3 * self.group[g]
        for subject, obj, r, pose in scene.relations:
            if slot in (subject, obj):
                v = v + RELATION_WEIGHT * self.pose[pose if slot == subject else (pose + r) % len(self.pose)]
        return v


@dataclass
class Scene:
    """What an image shows: objects as [type, attribute, group] rows (distinct types); the topic (-1: none);
    relations as (subject slot, object slot, relation, subject's pose); `n_relations` of the world (R).
    Subject and object carry poses from one table, so relation r from A to B looks exactly like relation
    (-r) mod R from B to A: the two are one configuration, and a caption of either describes it."""
    objects: list[list[int]]
    topic: int = -1
    relations: list[tuple[int, int, int, int]] = field(default_factory=list)
    n_relations: int = 0


def _as_scene(scene) -> Scene:
    """A Scene, or a plain list of [type, attribute, group] rows (a scene without relations)."""
    return scene if isinstance(scene, Scene) else Scene([list(o) for o in scene])


def _topic_types(cfg: SyntheticConfig, topic: int, inside: bool) -> np.ndarray:
    return np.array([t for t in range(cfg.n_object_types) if (t % cfg.n_topics == topic) == inside])


def _backgrounds(rng, cfg: SyntheticConfig, topic: int, size):
    if topic < 0:
        return rng.integers(cfg.n_background, size=size)
    return rng.choice(np.arange(topic, cfg.n_background, cfg.n_topics), size=size)


def _scene(rng, cfg: SyntheticConfig) -> Scene:
    n = cfg.n_groups * cfg.objects_per_group
    topic, anchors = -1, []
    if cfg.n_topics:
        topic = int(rng.integers(cfg.n_topics))
        pool = _topic_types(cfg, topic, True)
        anchors = [int(t) for t in pool[:TOPIC_ANCHORS] if rng.random() < cfg.topic_affinity]
        k = int(rng.binomial(n - len(anchors), cfg.topic_affinity))
        types = rng.permutation(np.concatenate([anchors, rng.choice(pool[TOPIC_ANCHORS:], size=k, replace=False),
                                                rng.choice(_topic_types(cfg, topic, False), size=n - len(anchors) - k,
                                                           replace=False)]).astype(np.int64))
    else:
        types = rng.choice(cfg.n_object_types, size=n, replace=False)
    attrs = rng.integers(cfg.n_attributes, size=n)
    scene = Scene([[int(t), int(a), k // cfg.objects_per_group] for k, (t, a) in enumerate(zip(types, attrs))], topic,
                  n_relations=cfg.n_relations)
    if cfg.n_relations:  # between two of the topic's anchors when present (a topic's typical pair), else any two
        slots = [k for k, t in enumerate(types) if t in anchors]
        subject, obj = (int(i) for i in rng.choice(slots if len(slots) >= 2 else n, size=2, replace=False))
        scene.relations = [(subject, obj, int(rng.integers(cfg.n_relations)), int(rng.integers(cfg.n_relations)))]
    return scene


def _new_type(rng, cfg: SyntheticConfig, scene: Scene) -> int:
    present = {o[0] for o in scene.objects}
    if scene.topic >= 0:
        pool = _topic_types(cfg, scene.topic, bool(rng.random() < cfg.topic_affinity))
    else:
        pool = range(cfg.n_object_types)
    return int(rng.choice([t for t in pool if t not in present]))


def _variant(rng, cfg: SyntheticConfig, base: Scene) -> Scene:
    scene = Scene([list(o) for o in base.objects], base.topic, list(base.relations), base.n_relations)
    for slot in rng.choice(len(scene.objects), size=min(cfg.changes_per_member, len(scene.objects)), replace=False):
        if rng.random() < 0.5:  # new attribute
            scene.objects[slot][1] = int((scene.objects[slot][1] + rng.integers(1, cfg.n_attributes)) % cfg.n_attributes)
        else:  # new object type, not already in the scene
            scene.objects[slot][0] = _new_type(rng, cfg, scene)
    if scene.relations:  # a pose of its own; half the members relate the same two objects differently
        subject, obj, r, _ = scene.relations[0]
        if cfg.n_relations > 1 and rng.random() < 0.5:
            r = int((r + rng.integers(1, cfg.n_relations)) % cfg.n_relations)
        scene.relations = [(subject, obj, r, int(rng.integers(cfg.n_relations)))]
    return scene


def _regions(rng, cfg, world: _World, scene: Scene) -> np.ndarray:
    vecs = []
    for slot in range(len(scene.objects)):
        vecs += [world.features(scene, slot)] * int(rng.integers(3, 6))
    vecs = vecs[: cfg.n_regions]
    bg = world.background[_backgrounds(rng, cfg, scene.topic, cfg.n_regions - len(vecs))]
    feats = np.concatenate([np.stack(vecs), bg]) if len(bg) else np.stack(vecs)
    feats = feats + cfg.noise * rng.standard_normal(feats.shape).astype(np.float32)
    return np.maximum(feats[rng.permutation(cfg.n_regions)], 0)


def _grid(rng, cfg, world: _World, scene: Scene) -> np.ndarray:
    s = cfg.grid_size
    grid = world.background[_backgrounds(rng, cfg, scene.topic, (s, s))].copy()
    for slot, (t, a, g) in enumerate(scene.objects):
        lo, hi = int(g * s / cfg.n_groups), max(int((g + 1) * s / cfg.n_groups), int(g * s / cfg.n_groups) + 1)
        c0 = int(rng.integers(lo, max(lo + 1, hi - 1)))
        r0 = int(rng.integers(0, max(1, s - 1)))
        grid[r0:r0 + 2, c0:c0 + 2] += world.features(scene, slot)
    grid += cfg.noise * rng.standard_normal(grid.shape).astype(np.float32)
    return np.maximum(grid, 0)


def _phrase(rng, cfg, world: _World, obj) -> tuple[str, int]:
    """(noun phrase, the attribute it states or -1)."""
    t, a, _ = obj
    noun = world.nouns[t]
    if rng.random() < cfg.attribute_prob:
        adj = world.attributes[a]
        return f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {noun}", a
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}", -1


def _caption(rng, cfg, world: _World, scene: Scene) -> tuple[str, tuple]:
    """(caption text, its claims): (claim a, claim b, relation or -1), a claim (type, attribute or -1, group
    or -1) per object it names; a group is stated by the one-group templates (for both objects) and by the
    "{loc_a} ... {loc_b}" one. A relation caption reads "{a} {relation} {b}" (+ the location of a shared group)."""
    objects = scene.objects
    if scene.relations and rng.random() < cfg.relation_prob:
        i, j, r, _ = scene.relations[0]
        (a, attr_a), (b, attr_b) = _phrase(rng, cfg, world, objects[i]), _phrase(rng, cfg, world, objects[j])
        gi, gj = objects[i][2], objects[j][2]
        text = f"{a} {RELATIONS[r]} {b}"
        if gi == gj:
            text += f" {LOCATIONS[gi]}"
        else:
            gi = gj = -1
        return text + " .", ((objects[i][0], attr_a, gi), (objects[j][0], attr_b, gj), r)
    i, j = rng.choice(len(objects), size=2, replace=False)
    (a, attr_a), (b, attr_b) = _phrase(rng, cfg, world, objects[i]), _phrase(rng, cfg, world, objects[j])
    gi, gj = objects[i][2], objects[j][2]
    if gi == gj:
        text = TEMPLATES_ONE_GROUP[rng.integers(len(TEMPLATES_ONE_GROUP))].format(a=a, b=b, loc=LOCATIONS[gi])
    else:
        template = TEMPLATES_TWO_GROUPS[rng.integers(len(TEMPLATES_TWO_GROUPS))]
        text = template.format(a=a, b=b, loc_a=LOCATIONS[gi], loc_b=LOCATIONS[gj])
        if "{loc_a}" not in template:
            gi = gj = -1
    return text + " .", ((objects[i][0], attr_a, gi), (objects[j][0], attr_b, gj), -1)


def parse_caption(text: str, cfg: SyntheticConfig) -> tuple:
    """The claims of a caption of the generator's grammar (as `_caption` returns them): each noun phrase
    "a/an [adjective] noun" gives (type, attribute or -1, group or -1); one location phrase applies to both
    objects, two apply each to the phrase before it; a relation word between the two phrases gives the
    relation (else -1), from the first object to the second. Raises ValueError on text outside the grammar."""
    import re

    world_nouns = (NOUNS + [f"thing{i}" for i in range(cfg.n_object_types)])[: cfg.n_object_types]
    nouns = {n: t for t, n in enumerate(world_nouns)}
    attrs = {a: k for k, a in enumerate(ATTRIBUTES[: cfg.n_attributes])}
    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
    phrase = re.compile(rf"\ban? (?:({alt(attrs)}) )?({alt(nouns)})\b")
    where = re.compile(alt(LOCATIONS[: cfg.n_groups]))
    verbs = re.compile(rf"\b({alt(RELATIONS[: cfg.n_relations])})\b") if cfg.n_relations else None
    objects = [(m.start(), nouns[m.group(2)], attrs[m.group(1)] if m.group(1) else -1) for m in phrase.finditer(text)]
    locs = [(m.start(), LOCATIONS.index(m.group(0))) for m in where.finditer(text)]
    rels = [(m.start(), RELATIONS.index(m.group(1))) for m in verbs.finditer(text)] if verbs else []
    if (len(objects) != 2 or len(locs) > 2 or len(rels) > 1
            or (rels and not objects[0][0] < rels[0][0] < objects[1][0]) or (rels and len(locs) > 1)):
        raise ValueError(f"caption outside the synthetic grammar: {text!r}")
    if len(locs) == 2:
        groups = [next(g for pos, g in locs if pos > start) for start, _, _ in objects]
    else:
        groups = [locs[0][1] if locs else -1] * 2
    claims = tuple((t, a, g) for (_, t, a), g in zip(objects, groups))
    return claims + (rels[0][1] if rels else -1,)


def _matches(claim, obj) -> bool:
    t, a, g = claim
    return t == obj[0] and a in (-1, obj[1]) and g in (-1, obj[2])


def describes(claims, scene) -> bool:
    """Whether a caption with these claims (claim a, claim b, relation or -1) correctly describes `scene` (a
    Scene, or a list of [type, attribute, group] rows): every named object is present with the attribute and
    group stated (types are distinct in a scene, so the two claims always name two different objects), and a
    stated relation holds from the first named object to the second: the scene's relation r from A to B, or
    its converse reading, (-r) mod R from B to A (the same pose pair, see Scene)."""
    scene = _as_scene(scene)
    *named, relation = claims
    if not all(any(_matches(c, o) for o in scene.objects) for c in named):
        return False
    if relation < 0:
        return True
    a, b = named
    for i, j, r, _ in scene.relations:
        if r == relation and _matches(a, scene.objects[i]) and _matches(b, scene.objects[j]):
            return True
        if (-r) % scene.n_relations == relation and _matches(a, scene.objects[j]) and _matches(b, scene.objects[i]):
            return True
    return False


def positive_images(scenes, claims) -> list[list[int]]:
    """For each caption (claims), the sorted indices of the scenes it correctly describes (`describes`)."""
    scenes = [_as_scene(s) for s in scenes]
    by_type: dict[int, list[tuple[int, int, int]]] = {}
    for k, scene in enumerate(scenes):
        for t, a, g in scene.objects:
            by_type.setdefault(t, []).append((k, a, g))
    out = []
    for *named, relation in claims:
        sets = [{k for k, a2, g2 in by_type.get(t, ()) if a in (-1, a2) and g in (-1, g2)} for t, a, g in named]
        hits = set.intersection(*sets)
        if relation >= 0:
            hits = {k for k in hits if describes((*named, relation), scenes[k])}
        out.append(sorted(hits))
    return out


def _split_scenes(n: int, code: int, cfg: SyntheticConfig, world: _World):
    """(scene, region features, grid features, captions) of each image of a split, in order (one stream of
    random numbers: the rendered-image set draws the very same scenes and captions)."""
    rng = np.random.default_rng([cfg.seed, code])
    base = None
    for k in range(n):
        if k % cfg.family_size == 0:
            base = _scene(rng, cfg)
            scene = base
        else:
            scene = _variant(rng, cfg, base)
        regions, grid = _regions(rng, cfg, world, scene), _grid(rng, cfg, world, scene)
        yield scene, regions, grid, [_caption(rng, cfg, world, scene) for _ in range(cfg.captions_per_image)]


def _write_positives(root: Path, split: str, scenes, claims) -> None:
    from ..eccv_metrics import save_positives

    save_positives(root / POSITIVES_FILE.format(split=split), positive_images(scenes, claims), len(scenes))


def _write_split(root: Path, split: str, n: int, code: int, cfg: SyntheticConfig, world: _World) -> None:
    ims = np.lib.format.open_memmap(root / f"{split}_ims.npy", mode="w+", dtype=np.float32,
                                    shape=(n, cfg.n_regions, cfg.feat_dim))
    grids = np.lib.format.open_memmap(root / f"{split}_grids.npy", mode="w+", dtype=np.float32,
                                      shape=(n, cfg.grid_size, cfg.grid_size, cfg.feat_dim))
    captions, scenes, claims = [], [], []
    for k, (scene, regions, grid, caps) in enumerate(_split_scenes(n, code, cfg, world)):
        ims[k], grids[k] = regions, grid
        captions += [text for text, _ in caps]
        scenes.append(scene)
        claims += [c for _, c in caps]
    ims.flush()
    grids.flush()
    del ims, grids
    (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    (root / f"{split}_ids.txt").write_text("\n".join(f"{split}-{k:06d}" for k in range(n)) + "\n")
    _write_positives(root, split, scenes, claims)


def _splits(cfg: SyntheticConfig):
    for code, (split, n) in enumerate((("train", cfg.n_train), ("dev", cfg.n_dev), ("test", cfg.n_test)), 1):
        if n < 1:
            raise ValueError(f"synthetic split {split!r} needs at least one image, got {n}")
        yield code, split, n


def scenes_and_claims(cfg: SyntheticConfig, split: str, world: _World | None = None) -> tuple[list, list]:
    """(scenes, claims of every caption in order) of a split of `cfg`, drawn again from its random stream."""
    for code, name, n in _splits(cfg):
        if name == split:
            scenes, claims = [], []
            for scene, _, _, caps in _split_scenes(n, code, cfg, world or _World(cfg)):
                scenes.append(scene)
                claims += [c for _, c in caps]
            return scenes, claims
    raise ValueError(f"a synthetic split is train, dev or test, got {split!r}")


def add_positives(cfg: SyntheticConfig, root: str | Path) -> None:
    """Writes the missing `{split}_positives.npz` of a set generated before they existed (the scenes are
    drawn again from the same random streams; the other files are not touched)."""
    root, world = Path(root), _World(cfg)
    for _, split, _ in _splits(cfg):
        if not (root / POSITIVES_FILE.format(split=split)).is_file():
            _write_positives(root, split, *scenes_and_claims(cfg, split, world))


def generate(cfg: SyntheticConfig, root: str | Path) -> Path:
    """Writes train/dev/test splits of `cfg` into `root` (regions, grids, captions, ids, params.json)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    world = _World(cfg)
    for code, split, n in _splits(cfg):
        _write_split(root, split, n, code, cfg, world)
    (root / "params.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, **asdict(cfg)}, indent=1))
    return root


def ensure_synthetic(cfg: SyntheticConfig | dict | None = None, cache_dir: str | Path | None = None,
                     verbose: bool = False, kind: str = "features") -> Path:
    """The folder of the synthetic set `cfg` under the cache, generated on first use (atomically:
    written to a temporary folder, then renamed, so an interrupted generation is never reused).
    kind "images": the same world rendered as images (`ensure_synthetic_images`)."""
    cfg = cfg if isinstance(cfg, SyntheticConfig) else SyntheticConfig.from_dict(cfg)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if kind == "images":
        root, make = cache / f"synthetic-images-v{RENDER_VERSION}-{cfg.digest()}", generate_images
    else:
        root, make = cache / f"synthetic-{cfg.digest()}", generate
    if (root / "params.json").is_file():
        add_positives(cfg, root)  # a cache made before the ground-truth files existed
        return root
    tmp = cache / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"generating the synthetic data set into {root} ...", flush=True)
    make(cfg, tmp)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "params.json").is_file():
            raise
    return root


# ---------------------------------------------------------------------------- rendered as images
RENDER_VERSION = 2  # 2: pose marks in grey levels (v1's first pose colour was object colour 0's)
IMAGE_PX = 48          # rendered image side: 3 column bands of 16 px, 2 object cells of 24 px rows each
SHAPES = ("square", "disc", "triangle", "cross", "ring", "diamond")
TEXTURES = ("solid", "horizontal stripes", "vertical stripes", "checks")
SIZES = (8, 11, 14)    # px


def _palette(n: int, lo: float) -> np.ndarray:
    """n distinct RGB colours: hues around the circle, alternating brightness."""
    import colorsys

    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 0.85, 1.0 if i % 2 == 0 else lo)]
                     for i in range(n)], dtype=np.float32)


def _shape_mask(shape: str, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s] + 0.5
    c, r = s / 2, np.hypot(np.mgrid[0:s, 0:s][0] + 0.5 - s / 2, np.mgrid[0:s, 0:s][1] + 0.5 - s / 2)
    return {"square": np.ones((s, s), bool), "disc": r <= c, "triangle": y >= s - 2 * np.abs(x - c) * 1.0,
            "cross": (np.abs(x - c) < s / 5) | (np.abs(y - c) < s / 5), "ring": (r <= c) & (r >= 0.55 * c),
            "diamond": np.abs(x - c) + np.abs(y - c) <= c}[shape]


def _texture_mask(texture: str, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s]
    return {"solid": np.ones((s, s), bool), "horizontal stripes": (y // 2) % 2 == 0,
            "vertical stripes": (x // 2) % 2 == 0, "checks": ((x // 2) + (y // 2)) % 2 == 0}[texture]


def render_scene(scene, cfg: SyntheticConfig, rng: np.random.Generator, px: int = IMAGE_PX) -> np.ndarray:
    """(px, px, 3) uint8: the background type as a noisy colour; each object [type, attribute, group] in
    its group's column band, one cell per object (top / bottom half), at a random place inside it.
    Type t: shape SHAPES[t % 6], colour palette[t // 6] (so 120 types = 6 shapes x 20 colours);
    attribute a: size SIZES[a % 3], texture TEXTURES[(a // 3) % 4] (the off texels darkened).
    A relation's two objects each carry a 3 x 3 px pose mark at their top-left corner, its grey level the
    pose (as the region features: the relation is the difference of the two marks, neither shows it alone).
    `scene`: a Scene, or a list of object rows."""
    scene = _as_scene(scene)
    colours = _palette(max(1, -(-cfg.n_object_types // len(SHAPES))), 0.55)
    backgrounds = _palette(cfg.n_background, 0.6) * 0.35
    img = np.empty((px, px, 3), np.float32)
    if scene.topic >= 0:
        img[:] = backgrounds[int(rng.choice(np.arange(scene.topic, cfg.n_background, cfg.n_topics)))]
    else:
        img[:] = backgrounds[int(rng.integers(cfg.n_background))]
    poses = {}
    for subject, obj, r, pose in scene.relations:
        poses[subject], poses[obj] = pose, (pose + r) % cfg.n_relations
    # Grey levels: no object or background colour is grey (all are saturated hues), so a mark always shows.
    pose_grey = np.linspace(60, 255, max(1, cfg.n_relations))
    band = px / cfg.n_groups
    cell = px / cfg.objects_per_group
    slots: dict[int, int] = {}
    for slot, (t, a, g) in enumerate(scene.objects):
        k = slots.get(g, 0)
        slots[g] = k + 1
        s = min(SIZES[a % len(SIZES)], int(band), int(cell))
        x0 = int(g * band) + int(rng.integers(0, max(1, int(band) - s + 1)))
        y0 = int(k * cell) + int(rng.integers(0, max(1, int(cell) - s + 1)))
        mask = _shape_mask(SHAPES[t % len(SHAPES)], s)
        colour = colours[t // len(SHAPES)]
        tex = _texture_mask(TEXTURES[(a // len(SIZES)) % len(TEXTURES)], s)
        patch = np.where(tex[..., None], colour, colour * 0.35)
        view = img[y0:y0 + s, x0:x0 + s]
        view[mask] = patch[mask]
        if slot in poses:
            img[y0:y0 + 3, x0:x0 + 3] = pose_grey[poses[slot]]
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_images(cfg: SyntheticConfig, root: str | Path) -> Path:
    """The synthetic world rendered as PNG images in the plain raw-image layout (`{split}_images.txt`,
    `{split}_caps.txt`, `{split}_ids.txt`, `images/`), the same scenes and captions as `generate`, plus
    `bert/`: a small BERT configuration (2 layers, hidden 64) with random weights and a word-level
    tokenizer of the world's words (written with save_pretrained), the text backbone of the presets."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    world = _World(cfg)
    words: set[str] = set()
    for code, split, n in _splits(cfg):
        names, captions, scenes, claims = [], [], [], []
        for k, (scene, _, _, caps) in enumerate(_split_scenes(n, code, cfg, world)):
            name = f"images/{split}-{k:06d}.png"
            Image.fromarray(render_scene(scene, cfg, np.random.default_rng([cfg.seed, code, k, 7]))).save(root / name)
            names.append(name)
            captions += [text for text, _ in caps]
            scenes.append(scene)
            claims += [c for _, c in caps]
        _write_positives(root, split, scenes, claims)
        for c in captions:
            words.update(c.split())
        (root / f"{split}_images.txt").write_text("\n".join(names) + "\n")
        (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
        (root / f"{split}_ids.txt").write_text("\n".join(f"{split}-{k:06d}" for k in range(n)) + "\n")
    write_small_bert(root / "bert", sorted(words), seed=cfg.seed)
    (root / "params.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, "render_version": RENDER_VERSION,
                                                  "image_px": IMAGE_PX, **asdict(cfg)}, indent=1))
    return root


def write_small_bert(folder: Path, words: list[str], hidden: int = 64, layers: int = 2, heads: int = 2,
                     seed: int = 0) -> Path:
    """A small BERT (random weights, seeded) with a word-level WordPiece vocabulary, via save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in words if w not in ("[PAD]", "[UNK]")]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=64))
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def ensure_synthetic_images(cfg: SyntheticConfig | dict | None = None, cache_dir: str | Path | None = None,
                            verbose: bool = False) -> Path:
    """The rendered-image synthetic set of `cfg` under the cache (`synthetic-images-v<render>-<hash>`)."""
    return ensure_synthetic(cfg, cache_dir, verbose, kind="images")

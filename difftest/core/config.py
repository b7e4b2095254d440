"""One campaign configuration: the image options and the backing set-up, drawn once per run.

The valid combinations follow qemu-img create (block/qcow2.c, qcow2_co_create_opts and
qcow2_co_create): extended_l2, zstd, lazy_refcounts and data files need compat=1.1
(version 3); extended L2 needs clusters of at least 16 KiB; data_file_raw needs a data file
and no backing file.

Encryption (``encrypt``, ``encrypt_cipher``, ``encrypt_backing``): LUKS or legacy AES on the
top image, and optionally LUKS on the qcow2 backing layers, with the fixed test passphrases
KEY_SECRET and BACKING_KEY_SECRET (they are not secrets: they are in every reproducer). An
encrypted top image is made once per example by qemu-img and copied to every target
(difftest/core/targets.py, ``cached_base``), so all targets share its LUKS master key and can
be compared byte for byte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from spec.geometry import Geometry
from spec.limits import MIN_CLUSTER_BITS_EXTENDED_L2

BACKINGS = ("none", "raw", "qcow2", "qcow2x2")
"""none; a raw file; one qcow2; two qcow2 levels (the lower one written first)."""
BACKING_SIZES = ("same", "shorter", "longer")
ENCRYPTS = ("none", "luks", "aes")
"""No encryption, LUKS (qcow2 crypt_method 2) or legacy AES-CBC (crypt_method 1), the
``encrypt.format`` values of qemu-img create."""
LUKS_CIPHERS: dict[str, dict[str, str]] = {
    # QEMU's default: encrypt.cipher-alg=aes-256, cipher-mode=xts, ivgen-alg=plain64.
    "aes-256-xts-plain64": {"cipher_alg": "aes-256", "cipher_mode": "xts", "ivgen_alg": "plain64"},
    # CBC chains restart at each sector; ESSIV encrypts the sector number (sha256 of the key).
    "aes-128-cbc-essiv": {"cipher_alg": "aes-128", "cipher_mode": "cbc", "ivgen_alg": "essiv",
                          "ivgen_hash_alg": "sha256"},
    # The 32-bit sector number of ``plain`` (it wraps past 2 TiB of host offset).
    "aes-256-cbc-plain": {"cipher_alg": "aes-256", "cipher_mode": "cbc", "ivgen_alg": "plain"},
}
"""The LUKS payload ciphers drawn, as qemu-img's ``encrypt.*`` create options. Twofish and
Serpent, which QEMU also accepts, are left out: the model (spec/encryption.py) has no
cipher for them, and a configuration only the oracle can run compares nothing."""
LUKS_ITER_TIME = 10
"""``encrypt.iter-time`` in ms: QEMU's PBKDF2 benchmark picks the iteration count, so a
short time keeps every open of the image cheap (the default, 2000 ms, costs 2 s an open)."""
KEY_SECRET = "qcow2lab-top-key"
BACKING_KEY_SECRET = "qcow2lab-backing-key"
"""The passphrases (``--object secret,data=...``; QEMU's secret ids are ``sec0`` and ``sec1``).
Different, so a target that unlocks a layer with the other layer's key fails to open."""
OVERLAP_CHECKS = ("cached", "none", "constant", "all")
"""QEMU's overlap-check modes (block/qcow2.c, qcow2_update_options_prepare); cached is the
default."""
CACHE_FIELDS = ("l2_cache_size", "l2_cache_entry_size", "refcount_cache_size")
"""The pure cache-size knobs (DESIGN.md: an engine without caches may accept and ignore them)."""


@dataclass(frozen=True)
class Config:
    version: int = 3
    cluster_size: int = 65536
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: str = "zlib"
    lazy_refcounts: bool = False
    backing: str = "none"
    backing_size: str = "same"
    data_file: bool = False
    data_file_raw: bool = False
    size: int = 4 << 20
    # Open options (impl/options.py, QEMU's names with "_"); None is QEMU's default. They go
    # to the impl's open() and to qemu-io as -o l2-cache-size=... (see qemu_open_options).
    l2_cache_size: int | None = None
    l2_cache_entry_size: int | None = None
    refcount_cache_size: int | None = None
    overlap_check: str = "cached"
    encrypt: str = "none"
    encrypt_cipher: str = "aes-256-xts-plain64"
    """One of LUKS_CIPHERS; used only with encrypt="luks"."""
    encrypt_backing: bool = False
    """The qcow2 backing layers are LUKS-encrypted with BACKING_KEY_SECRET."""

    def validate(self) -> None:
        """Raise ValueError for a combination qemu-img create refuses."""
        if self.version not in (2, 3):
            raise ValueError("version must be 2 or 3")
        if self.cluster_size & (self.cluster_size - 1) or not 512 <= self.cluster_size <= 2 << 20:
            raise ValueError("cluster_size must be a power of two in 512..2M")
        if self.version == 2 and (self.extended_l2 or self.compression_type != "zlib"
                                  or self.lazy_refcounts or self.data_file or self.refcount_bits != 16):
            raise ValueError("v2 images have none of extended_l2, zstd, lazy_refcounts, data_file, "
                             "refcount_bits != 16")
        if self.extended_l2 and self.cluster_size < 1 << MIN_CLUSTER_BITS_EXTENDED_L2:
            raise ValueError("extended_l2 needs cluster_size >= 16K")
        if self.data_file_raw and not self.data_file:
            raise ValueError("data_file_raw needs data_file")
        if self.data_file_raw and self.backing != "none":
            # qcow2_co_create: "Backing file and data-file-raw cannot be used at the same time"
            raise ValueError("data_file_raw excludes a backing file")
        if self.backing not in BACKINGS or self.backing_size not in BACKING_SIZES:
            raise ValueError("bad backing set-up")
        if self.size % 512:
            raise ValueError("size must be a multiple of 512")
        e = self.l2_cache_entry_size
        if e is not None and (e & (e - 1) or not 512 <= e <= self.cluster_size):
            # read_cache_sizes: "L2 cache entry size must be a power of two between 512 and
            # the cluster size"
            raise ValueError("l2_cache_entry_size must be a power of two from 512 to the cluster size")
        if self.overlap_check not in OVERLAP_CHECKS:
            raise ValueError(f"overlap_check must be one of {OVERLAP_CHECKS}")
        if self.encrypt not in ENCRYPTS:
            raise ValueError(f"encrypt must be one of {ENCRYPTS}")
        if self.encrypt_cipher not in LUKS_CIPHERS:
            raise ValueError(f"encrypt_cipher must be one of {sorted(LUKS_CIPHERS)}")
        if self.encrypt != "none" and self.data_file:
            # qemu-img allows it; the harness does not: the shared encrypted base image
            # would name one target's data file (targets.data_path) in every copy.
            raise ValueError("the harness does not combine encryption with an external data file")
        if self.encrypt_backing and self.backing not in ("qcow2", "qcow2x2"):
            raise ValueError("encrypt_backing needs a qcow2 backing file")

    @property
    def encrypted(self) -> bool:
        """Whether any layer is encrypted (every open then needs a key)."""
        return self.encrypt != "none" or self.encrypt_backing

    def features(self) -> frozenset[str]:
        """The spec.errors.UnsupportedFeature names this configuration's images use that a
        target may lack; a target refusing one of these at open sits the example out
        (difftest/core/lockstep.py) instead of diverging."""
        return frozenset({"encryption"} if self.encrypted else ())

    def key_options(self) -> dict[str, Any]:
        """The open() keywords that unlock the images (model/image.py, spec.interface)."""
        out: dict[str, Any] = {}
        if self.encrypt != "none":
            out["key_secret"] = KEY_SECRET
        if self.encrypt_backing:
            out["backing_key_secret"] = BACKING_KEY_SECRET
        return out

    def encrypt_create_options(self) -> dict[str, Any]:
        """qemu-img create's ``encrypt.*`` options of the top image, '.' spelled '_' (the
        names of spec.interface's create()); the key is given by secret id (sec0)."""
        if self.encrypt == "none":
            return {}
        out: dict[str, Any] = {"encrypt_format": self.encrypt, "encrypt_key_secret": "sec0"}
        if self.encrypt == "luks":
            out.update({f"encrypt_{k}": v for k, v in LUKS_CIPHERS[self.encrypt_cipher].items()})
            out["encrypt_iter_time"] = LUKS_ITER_TIME
        return out

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cluster_size.bit_length() - 1, self.extended_l2,
                        self.refcount_bits.bit_length() - 1)

    @property
    def backing_bytes(self) -> int:
        if self.backing_size == "shorter":
            return (self.size // 2) // 512 * 512 + 512
        if self.backing_size == "longer":
            return self.size + 3 * 512 + self.cluster_size
        return self.size

    def create_options(self) -> dict[str, Any]:
        """Keyword options of spec.interface's create()."""
        return {"version": self.version, "cluster_size": self.cluster_size,
                "refcount_bits": self.refcount_bits, "extended_l2": self.extended_l2,
                "compression_type": self.compression_type, "lazy_refcounts": self.lazy_refcounts}

    @property
    def cache_defaults(self) -> bool:
        """Whether every open option is QEMU's default. The model (no cache) lays out its file
        byte for byte as QEMU does with these only: a smaller l2-cache-entry-size makes QEMU
        cut allocating requests at slice boundaries (handle_alloc and friends stop at the end
        of an L2 slice), so its allocation order can differ."""
        return all(getattr(self, f) is None for f in CACHE_FIELDS) and self.overlap_check == "cached"

    def cache_size_options(self) -> dict[str, Any]:
        """The pure cache-size knobs that are set, as open() keywords."""
        return {f: getattr(self, f) for f in CACHE_FIELDS if getattr(self, f) is not None}

    def open_options(self) -> dict[str, Any]:
        """Every open option that is set, as open() keywords (impl/options.py)."""
        out = self.cache_size_options()
        if self.overlap_check != "cached":
            out["overlap_check"] = self.overlap_check
        return out

    def qemu_open_options(self) -> str:
        """The same options in QEMU's spelling, for qemu-io's ``--image-opts`` and ``open -o``
        ("" when all are defaults). qemu-img check and map take none: they only read."""
        return ",".join(f"{k.replace('_', '-')}={v}" for k, v in self.open_options().items())

    def short(self) -> str:
        parts = [f"v{self.version}", _human(self.cluster_size), f"rc{self.refcount_bits}"]
        if self.extended_l2:
            parts.append("extl2")
        if self.compression_type != "zlib":
            parts.append(self.compression_type)
        if self.lazy_refcounts:
            parts.append("lazy")
        if self.backing != "none":
            parts.append(f"backing={self.backing}/{self.backing_size}")
        if self.data_file:
            parts.append("data_file_raw" if self.data_file_raw else "data_file")
        parts.append(_human(self.size))
        if self.l2_cache_size is not None:
            parts.append(f"l2c={_human(self.l2_cache_size)}")
        if self.l2_cache_entry_size is not None:
            parts.append(f"slice={_human(self.l2_cache_entry_size)}")
        if self.refcount_cache_size is not None:
            parts.append(f"rcc={_human(self.refcount_cache_size)}")
        if self.overlap_check != "cached":
            parts.append(f"overlap={self.overlap_check}")
        if self.encrypt == "luks":
            parts.append(f"luks={self.encrypt_cipher}")
        elif self.encrypt == "aes":
            parts.append("aes")
        if self.encrypt_backing:
            parts.append("luks-backing")
        return ",".join(parts)

    def replace(self, **kw: Any) -> Config:
        return dataclasses.replace(self, **kw)


def _human(n: int) -> str:
    for unit, sh in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << sh and n % (1 << sh) == 0:
            return f"{n >> sh}{unit}"
    return str(n)


@dataclass(frozen=True)
class Choice:
    """A ``--config`` set or exclusion: ``backing=none,qcow2`` (only these values) or
    ``backing=!raw`` (``!a,b``: neither). The strategy draws what it would draw anyway and
    keeps only what the choice allows, so the weights among allowed values are unchanged.
    A single value without ``!`` stays a plain pinned value, not a Choice."""

    values: tuple[Any, ...]
    exclude: bool = False

    def allows(self, value: Any) -> bool:
        # ``is``-exact for bools: True == 1 would let a bool through a set of ints.
        hit = any(v == value and type(v) is type(value) for v in self.values)
        return hit != self.exclude

    def __str__(self) -> str:
        return ("!" if self.exclude else "") + ",".join(str(v) for v in self.values)


def allows(ov: dict[str, Any], name: str, value: Any) -> bool:
    """Whether overrides ``ov`` let field ``name`` take ``value``."""
    if name not in ov:
        return True
    pin = ov[name]
    return pin.allows(value) if isinstance(pin, Choice) else pin == value


def pinned(ov: dict[str, Any], name: str, default: Any = None) -> Any:
    """The value ``ov`` pins ``name`` to; ``default`` when it is free or only restricted."""
    pin = ov.get(name, default)
    return default if isinstance(pin, Choice) else pin


def restrict(ov: dict[str, Any], name: str, excluded: set[Any] | frozenset[Any], why: str) -> None:
    """Exclude ``excluded`` values of field ``name`` in ``ov`` (merged with what is there):
    how a target's capabilities (difftest/adapters, ``UNSUPPORTED``) narrow the campaign.
    ValueError when ``ov`` pins an excluded value: nothing would be left to run."""
    if not excluded:
        return
    pin = ov.get(name)
    if name in ov and not isinstance(pin, Choice):
        if not Choice(tuple(excluded), exclude=True).allows(pin):
            raise ValueError(f"--config {name}={pin}: {why}")
        return
    if isinstance(pin, Choice) and not pin.exclude:
        left = tuple(v for v in pin.values if Choice(tuple(excluded), exclude=True).allows(v))
        if not left:
            raise ValueError(f"--config {name}={pin}: {why}")
        ov[name] = Choice(left)
        return
    old = pin.values if isinstance(pin, Choice) else ()
    ov[name] = Choice(_sorted({*old, *excluded}), exclude=True)


def _sorted(values: set[Any]) -> tuple[Any, ...]:
    """A stable order (the overrides are part of the example database key)."""
    try:
        return tuple(sorted(values, key=lambda v: (v is not None, v)))
    except TypeError:
        return tuple(sorted(values, key=repr))


def unsupported_by(cfg: Config, declared: dict[str, Any], who: str) -> str | None:
    """Which ``field=value`` of ``cfg`` an adapter's ``UNSUPPORTED`` declaration (Config
    field name -> values it does not support) names, or None. ValueError for a field that
    is not a Config field: a typo would silently declare nothing."""
    for name, values in declared.items():
        if name not in {f.name for f in dataclasses.fields(Config)}:
            raise ValueError(f"{who}: UNSUPPORTED names {name!r}, not a configuration field")
        if not Choice(tuple(values), exclude=True).allows(getattr(cfg, name)):
            return f"{name}={getattr(cfg, name)}"
    return None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--config KEY=VAL`` pairs into typed Config fields (sizes accept K/M/G). ``VAL`` may
    be a set, ``a,b`` (draw only these), or an exclusion, ``!a`` or ``!a,b`` (never these),
    which become a ``Choice``; several exclusions of one field add up, and a later set or
    pinned value replaces what came before."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--config {pair!r}: expected KEY=VAL with KEY in {sorted(fields)}")
        exclude = val.strip().startswith("!")
        items = [v.strip() for v in val.strip().lstrip("!").split(",")]
        if (exclude or len(items) > 1) and "" in items:
            raise ValueError(f"--config {pair!r}: an empty value in a set")
        values = [_parse_value(key, v) for v in items]
        if exclude:
            restrict(out, key, set(values), f"--config {pair} excludes it")
        elif len(values) > 1:
            out[key] = Choice(tuple(dict.fromkeys(values)))
        else:
            out[key] = values[0]
    return out


def _parse_value(key: str, val: str) -> Any:
    default = getattr(Config(), key)
    if key in CACHE_FIELDS:  # None by default: a size, or "default"
        return None if val.lower() in ("", "default", "none") else _parse_int(val)
    if isinstance(default, bool):
        return val.lower() in ("1", "on", "true", "yes")
    if isinstance(default, int):
        return _parse_int(val)
    return val


def _parse_int(val: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    v = val.strip().lower()
    if v and v[-1] in mult:
        return int(v[:-1]) * mult[v[-1]]
    return int(v, 0)


@st.composite
def configs(draw: st.DrawFn, overrides: dict[str, Any] | None = None) -> Config:
    """Configurations weighted towards small clusters (many boundaries per byte written).
    ``overrides`` pin fields to a value or restrict them to a ``Choice`` (parse_overrides)."""
    ov = overrides or {}

    def pick(name: str, strat: st.SearchStrategy[Any]) -> Any:
        if name in ov and not isinstance(ov[name], Choice):
            return ov[name]
        if name in ov:
            return draw(strat.filter(ov[name].allows))
        return draw(strat)

    version = pick("version", st.sampled_from([3, 3, 3, 2]))
    cluster_bits = pick("cluster_size", st.sampled_from(
        [9, 9, 10, 12, 12, 14, 16, 16, 21]).map(lambda b: 1 << b))
    cluster_size = int(cluster_bits)
    v3 = version == 3
    extended_l2 = pick("extended_l2", st.booleans() if v3 and cluster_size >= 16384 else st.just(False))
    refcount_bits = pick("refcount_bits", st.sampled_from([16, 16, 1, 2, 4, 8, 32, 64])
                         if v3 else st.just(16))
    compression = pick("compression_type", st.sampled_from(["zlib", "zstd"]) if v3 else st.just("zlib"))
    lazy = pick("lazy_refcounts", st.booleans() if v3 else st.just(False))
    backing = pick("backing", st.sampled_from(["qcow2", "qcow2x2"]) if pinned(ov, "encrypt_backing")
                   else st.sampled_from(BACKINGS))
    backing_size = pick("backing_size", st.sampled_from(BACKING_SIZES) if backing != "none"
                        else st.just("same"))
    data_file = pick("data_file", st.sampled_from([False, False, False, True])
                     if v3 and allows(ov, "encrypt", "none") else st.just(False))
    data_file_raw = pick("data_file_raw", st.booleans() if data_file and backing == "none"
                         else st.just(False))
    g = Geometry(cluster_size.bit_length() - 1, bool(extended_l2))
    # Sizes: a few clusters, or a bit more than one L2 table's reach so an L1 boundary is
    # inside the image (kept below 1 GiB of virtual size so a whole-image compare stays cheap
    # in sparse form), with a sector-granular tail so the image end is not cluster-aligned.
    cap = 1 << 30
    choices = [cluster_size * 8, cluster_size * 37 + 512 * 3]
    if g.l2_coverage * 2 <= cap:
        choices.append(g.l2_coverage + cluster_size * 3 + 512)
    size = pick("size", st.sampled_from(choices))
    # Cache options, defaults first (Hypothesis shrinks towards them, so a reproducer keeps
    # a non-default option only when the bug needs it). Tiny L2 caches (2 or 3 slices, the
    # minimum is 2) make eviction and write-back happen on nearly every request.
    entry = pick("l2_cache_entry_size", st.sampled_from(
        [None, *sorted({e for e in (512, 4096, cluster_size) if e <= cluster_size})]))
    # Without an explicit entry size, a cache smaller than the disk's L2 tables works in
    # 4 KiB slices (impl/options.py, read_cache_sizes).
    unit = entry or min(4096, cluster_size)
    if "l2_cache_size" in ov and not isinstance(ov["l2_cache_size"], Choice):
        l2_cache = ov["l2_cache_size"]
    elif isinstance(ov.get("l2_cache_size"), Choice) and not ov["l2_cache_size"].exclude:
        l2_cache = draw(st.sampled_from(ov["l2_cache_size"].values))
    else:
        slices = draw(st.sampled_from([None, 2, 2, 3, 16]).filter(
            lambda k: allows(ov, "l2_cache_size", None if k is None else k * unit)))
        l2_cache = None if slices is None else slices * unit
    rc_cache = pick("refcount_cache_size", st.sampled_from([None, 4 * cluster_size, 16 * cluster_size]))
    overlap = pick("overlap_check", st.sampled_from(OVERLAP_CHECKS))
    # Encryption in about one example in ten, "none" first so that Hypothesis shrinks towards
    # it; not with an external data file (see Config.validate).
    encrypt = pick("encrypt", st.just("none") if data_file
                   else st.sampled_from(("none",) * 36 + ("luks", "luks", "luks", "aes")))
    cipher = pick("encrypt_cipher", st.sampled_from(sorted(LUKS_CIPHERS, key=_cipher_order))
                  if encrypt == "luks" else st.just(Config.encrypt_cipher))
    encrypt_backing = pick("encrypt_backing", st.sampled_from([False, True])
                           if encrypt != "none" and backing in ("qcow2", "qcow2x2") else st.just(False))
    cfg = Config(version=int(version), cluster_size=cluster_size, refcount_bits=int(refcount_bits),
                 extended_l2=bool(extended_l2), compression_type=str(compression), lazy_refcounts=bool(lazy),
                 backing=str(backing), backing_size=str(backing_size), data_file=bool(data_file),
                 data_file_raw=bool(data_file_raw), size=int(size), l2_cache_size=l2_cache,
                 l2_cache_entry_size=entry, refcount_cache_size=rc_cache, overlap_check=str(overlap),
                 encrypt=str(encrypt), encrypt_cipher=str(cipher), encrypt_backing=bool(encrypt_backing))
    cfg.validate()
    # A restriction a dependent field could not honour (``data_file=!False`` on a v2 image,
    # where the strategy has only False): this draw is invalid, Hypothesis draws another.
    assume(all(allows(ov, f, getattr(cfg, f)) for f in ov))
    return cfg


def _cipher_order(name: str) -> int:
    """QEMU's default cipher first (Hypothesis shrinks towards the first)."""
    return 0 if name == Config.encrypt_cipher else 1


def edge_points(cfg: Config, size: int) -> list[int]:
    """The guest offsets where qcow2 implementations go wrong, for an image of ``size``
    bytes: subcluster, cluster, L2-slice and L1 boundaries, the middle and the end, and the
    end of the backing file. The state machine draws offsets near them, and the backing
    file's pattern covers them (difftest/core/targets.py)."""
    g = cfg.geometry
    c = cfg.cluster_size
    slice_reach = (4096 // g.l2_entry_size) * c  # QEMU's default 4 KiB L2 cache slice
    # ... and the configured slice: requests are cut there, and 2 of them fill a tiny cache.
    entry = cfg.l2_cache_entry_size or 4096
    own_reach = (entry // g.l2_entry_size) * c
    pts = {0, size, g.subcluster_size, 2 * g.subcluster_size + c, c, 2 * c, 3 * c, slice_reach,
           own_reach, 2 * own_reach,
           g.l2_coverage, 2 * g.l2_coverage, size - c, size // 2 // c * c, cfg.backing_bytes}
    return sorted(p for p in pts if 0 <= p <= size)

r"""Secure aggregation: the server learns the sum of the clients' updates and nothing else,
even when clients drop out mid-protocol.

The protocol is Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning" (CCS 2017), on the full graph, or SecAgg+ (Bell, Bonawitz, Gascon,
Lepoint and Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020) on a k-regular neighbour graph. Client u sends

.. math::

    y_u = w_u q_u + \mathrm{PRG}(b_u) + \sum_{v \in N(u)} \pm \mathrm{PRG}(s_{uv})
    \pmod{2^{\text{bits}}}

with :math:`q_u` its update quantised to Q levels of [-c, c] (:func:`ring_quantize`, the
integer weight :math:`w_u` carried as an extra element, as Flower does), :math:`b_u` a
fresh self-mask seed, :math:`s_{uv}` an X25519 + HKDF-SHA256 key it shares with neighbour
v (+ for u < v, - for u > v, so the pair's masks cancel in the sum). Each mask is
AES-256-CTR's keystream, one stream per (pair, round). Before masking, u splits
:math:`b_u` and its mask secret key into t-of-n Shamir shares (:func:`split_secret`) for
its neighbours, encrypted for each with AES-GCM. When clients drop after sending their
shares, the survivors' shares let the server rebuild the dropped clients' mask keys (so it
can remove their pairwise masks) and the survivors' self-mask seeds, never both for one
client (the *double-masking invariant*, enforced by every client and by the server).

Phases (message classes in brackets): advertise keys (:class:`PublicKeys`), share keys
(:class:`EncryptedShares`), masked input (:class:`MaskedInput`), unmask
(:class:`UnmaskRequest`, then lists of :class:`Share`); :class:`Client` and
:class:`Server` hold each side's state, :class:`SecAggConfig` the public parameters.

**Threat model.** The server is *honest but curious*: it follows the protocol (it relays
every message unmodified and reports dropouts truthfully) but tries to learn individual
updates from what it sees. Against such a server, possibly colluding with fewer than t
clients, the masked vectors are uniform on the ring and the server learns only the sum
of the surviving clients' weighted updates. There are *no authenticated channels*: the
public keys are relayed by the server and not signed, so a *malicious* server (one that
substitutes keys, lies about who dropped, or sends different clients different views)
is **not** defended against; Bonawitz et al.'s signature-based active-security variant is
not implemented. The sum itself is revealed exactly (add differential privacy noise,
``fedkern.privacy``, to protect it). Quantisation is public: c, Q and the ring size.

``cryptography`` (``pip install 'fedkern[secagg]'``) provides X25519, HKDF, AES-CTR and
AES-GCM; it is imported on first use only. The ring arithmetic (quantisation, adding
keystreams, decoding) runs on fedkern's kernels; keystreams are generated and added in
cache-sized chunks on ``fedkern.get_num_threads()`` threads.

Every security-relevant failure raises :class:`SecAggError`: too few survivors (< t), a
share of another client, holder or round, a secret that does not match its commitment, a
ring too small for the sum, masks that do not cancel.
"""
from __future__ import annotations

import functools
import hashlib
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from . import _validate as check
from ._errors import BackendUnavailableError, FedkernTypeError, FedkernValueError
from ._updates import DTypeLike, Updates
from .backends import get_num_threads, kernels

__all__ = ["ring_quantize", "ring_dequantize", "add_masks", "ring_bits_needed", "split_secret", "combine_shares",
           "SecAggConfig", "Client", "Server", "PublicKeys", "EncryptedShares", "MaskedInput", "UnmaskRequest",
           "Share", "SecAggError", "PRIME"]

#: The Shamir field: the Mersenne prime 2^521 - 1, larger than any 256-bit secret.
PRIME = 2**521 - 1
RING_DTYPES = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_KEY_BYTES = 32
#: Coordinates per keystream chunk (64 KiB of uint32): a group of keystream rows and the
#: chunk of the output stay in L2 between OpenSSL's write and the add; a multiple of 4.
_MASK_CHUNK = 16384
#: Keystreams written per group before one add_masks call: enough to amortise the call.
_MASK_GROUP = 8
_SHARE_KINDS = ("seed", "key")  # the self-mask seed b_u, the mask secret key s_u
_Entropy = Callable[[int], bytes]


class SecAggError(FedkernValueError):
    """A secure aggregation round cannot give a correct sum without breaking its guarantees:
    too few survivors or shares, a share or message of another client or round, a secret
    that does not match its commitment, both secrets of one client asked for, or masks that
    did not cancel."""


@functools.cache
def _cryptography() -> SimpleNamespace:
    """The primitives of ``cryptography``, imported on first use."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as error:
        raise BackendUnavailableError("fedkern.secagg needs cryptography: pip install 'fedkern[secagg]'") from error
    return SimpleNamespace(InvalidTag=InvalidTag, hashes=hashes, X25519PrivateKey=X25519PrivateKey,
                           X25519PublicKey=X25519PublicKey, Cipher=Cipher, algorithms=algorithms, modes=modes,
                           AESGCM=AESGCM, HKDF=HKDF)


# --------------------------------------------------------------------------- ring arithmetic
def _ring_dtype(bits) -> np.dtype:
    if bits not in RING_DTYPES:
        raise FedkernValueError(f"bits must be 32 or 64 (the uint32 or uint64 ring); got {bits!r}")
    return RING_DTYPES[bits]


def _ring_vector(obj, name: str, length: int | None = None, writeable: bool = False) -> np.ndarray:
    """Validate a 1-D contiguous uint32/uint64 ring vector (of ``length``, if given)."""
    if not isinstance(obj, np.ndarray):
        raise FedkernTypeError(f"{name} must be a numpy array; got {type(obj).__name__}")
    if obj.dtype not in RING_DTYPES.values():
        raise FedkernTypeError(f"{name} has dtype {obj.dtype}; the ring is uint32 or uint64 (native byte order)")
    if obj.ndim != 1 or obj.shape[0] == 0:
        raise FedkernValueError(f"{name} must be a non-empty 1-D array; got shape {obj.shape}")
    if length is not None and obj.shape[0] != length:
        raise FedkernValueError(f"{name} has length {obj.shape[0]}; expected {length}")
    if not obj.flags.c_contiguous:
        raise FedkernValueError(f"{name} is not C-contiguous; pass np.ascontiguousarray({name})")
    if writeable and not obj.flags.writeable:
        raise FedkernValueError(f"{name} is read-only but is written in place")
    return obj


def ring_bits_needed(n_clients: int, levels: int, max_weight: int = 1) -> int:
    r"""The smallest ring (32 or 64 bits) that holds the sum of ``n_clients`` weighted updates.

    A quantised coordinate lies in [-ceil(Q/2), ceil(Q/2)], a weighted one within
    max_weight times that, so the signed sum fits when
    :math:`n \cdot Q' \cdot w_{max} < 2^{\text{bits}}` with Q' = Q rounded up to even.

    Examples
    --------
    >>> from fedkern import secagg
    >>> secagg.ring_bits_needed(100, 2**16), secagg.ring_bits_needed(100, 2**24, max_weight=1000)
    (32, 64)
    """
    need = check.count(n_clients, "n_clients", low=1) * (check.count(levels, "levels", low=1) + levels % 2) \
        * check.count(max_weight, "max_weight", low=1)
    for bits in RING_DTYPES:
        if need < 2**bits:
            return bits
    raise FedkernValueError(f"no ring holds {n_clients} x {levels} levels x weight {max_weight}: "
                            f"{need} >= 2^64; lower levels or max_weight")


def _check_ring_holds(n_clients: int, levels: int, max_weight: int, bits: int) -> None:
    if ring_bits_needed(n_clients, levels, max_weight) > bits:
        raise FedkernValueError(
            f"the {bits}-bit ring cannot hold the sum: n_clients * levels * max_weight = "
            f"{n_clients} * {levels + levels % 2} * {max_weight} >= 2^{bits}; use bits=64 or fewer levels")


def ring_quantize(x: np.ndarray, clip: float, levels: int, seed: int, *, stream: int = 0, weight: int = 1,
                  bits: int = 32, out: np.ndarray | None = None, backend: str | None = None) -> np.ndarray:
    r"""Fixed-point encode ``x`` into the ring: clip, scale to Q levels, round stochastically.

    :math:`q_j = \lfloor \min(\max(x_j, -c), c)\, Q / (2c) + u_j \rfloor` with
    :math:`u_j = w_j 2^{-32}`, :math:`w_j` word ``j`` of fedkern's Philox stream (seed, stream), so :math:`E[q_j] = x_j Q / (2c)`
    for :math:`|x_j| \le c` (unbiased stochastic rounding); the result is
    :math:`w q_j \bmod 2^{\text{bits}}`, a negative value wrapping around (two's complement).
    Bit-identical on every backend and thread count (the definition is in
    ``fedkern._reference.secagg``).

    Parameters
    ----------
    x : (D,) float32 or float64 array, finite
    clip : finite number > 0, c
    levels : int >= 1, Q: one level is 2c / Q
    seed, stream : ints in [0, 2**64), the rounding's random stream
    weight : int >= 0, w (e.g. the client's number of examples)
    bits : 32 or 64, the ring (ignored when ``out`` is given: its dtype is the ring)
    out : (D,) uint32 or uint64 array, optional

    Examples
    --------
    >>> from fedkern import secagg
    >>> secagg.ring_quantize(np.array([-1.0, 0.0, 0.5, 1.0]), clip=1.0, levels=4, seed=0)
    array([4294967294,          0,          1,          2], dtype=uint32)
    """
    x = check.vector(x, "x")
    clip = check.real(clip, "clip", low=0.0, low_inclusive=False)
    levels = check.count(levels, "levels", low=1)
    seed = check.count(seed, "seed", high=2**64 - 1)
    stream = check.count(stream, "stream", high=2**64 - 1)
    dtype = _ring_dtype(bits) if out is None else out.dtype
    weight = check.count(weight, "weight", high=2 ** (8 * np.dtype(dtype).itemsize) - 1)
    result = np.empty(x.shape[0], dtype) if out is None else _ring_vector(out, "out", x.shape[0], writeable=True)
    if kernels("aggregate", backend, "count_nonfinite").count_nonfinite(x):
        check.raise_nonfinite("ring_quantize", [x], name="x")
    kernels("secagg", backend, "quantize").quantize(x, clip, levels / (2.0 * clip), weight, seed, stream, result)
    return result


def ring_dequantize(total: np.ndarray, clip: float, levels: int, *, out: np.ndarray | None = None,
                    dtype: DTypeLike = None, backend: str | None = None) -> np.ndarray:
    r"""Decode a ring sum of quantised vectors: :math:`s_j \cdot 2c / Q`, values
    :math:`\ge 2^{\text{bits}-1}` read as negative (two's complement).

    The result is float64 unless ``dtype`` or ``out`` says otherwise (computed in float64,
    rounded once). Exact as long as the ring held the sum (:func:`ring_bits_needed`); the sum of n
    quantised vectors is within n 2c / Q of the clipped float sum per coordinate.

    Examples
    --------
    >>> from fedkern import secagg
    >>> q = secagg.ring_quantize(np.array([-1.0, 0.5]), clip=1.0, levels=4, seed=0)
    >>> secagg.ring_dequantize(q + q, clip=1.0, levels=4)
    array([-2.,  1.])
    """
    total = _ring_vector(total, "total")
    clip = check.real(clip, "clip", low=0.0, low_inclusive=False)
    levels = check.count(levels, "levels", low=1)
    result = check.out(out, total.shape, np.dtype(np.float64), dtype)
    kernels("secagg", backend, "dequantize").dequantize(total, 2.0 * clip / levels, result)
    return result


def _check_keys(keys, signs) -> tuple[list[bytes], list[int]]:
    keys, signs = list(keys), list(signs)
    if len(keys) != len(signs):
        raise FedkernValueError(f"keys and signs must have one entry per mask; got {len(keys)} and {len(signs)}")
    for i, key in enumerate(keys):
        if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            raise FedkernTypeError(f"keys[{i}] must be {_KEY_BYTES} bytes (an AES-256 key)")
    for i, sign in enumerate(signs):
        if sign not in (1, -1) or isinstance(sign, bool):
            raise FedkernValueError(f"signs[{i}] must be 1 or -1; got {sign!r}")
    return keys, signs


def add_masks(x: np.ndarray, keys: Sequence[bytes], signs: Sequence[int], *, out: np.ndarray | None = None,
              backend: str | None = None) -> np.ndarray:
    r"""Add keystream masks to a ring vector: :math:`x + \sum_m s_m \mathrm{PRG}(k_m) \bmod 2^{\text{bits}}`.

    :math:`\mathrm{PRG}(k)` is AES-256-CTR under key k from counter block 0 (a 128-bit
    big-endian counter) encrypting zeros, its bytes read as the ring's words in native
    byte order: a cryptographic stream, so a masked vector is uniform on the ring. The
    keystreams are written in chunks and added in the same pass (no D-long keystream is
    ever held), on ``fedkern.get_num_threads()`` threads.

    Parameters
    ----------
    x : (D,) uint32 or uint64 array
    keys : sequence of 32-byte keys
    signs : sequence of 1 or -1, one per key
    out : (D,) array of x's dtype, optional; ``out=x`` masks in place

    Examples
    --------
    >>> from fedkern import secagg
    >>> x = np.arange(4, dtype=np.uint32)
    >>> masked = secagg.add_masks(x, [bytes(32)], [1])
    >>> bool((masked != x).all()), secagg.add_masks(masked, [bytes(32)], [-1])
    (True, array([0, 1, 2, 3], dtype=uint32))
    """
    x = _ring_vector(x, "x")
    keys, signs = _check_keys(keys, signs)
    result = np.array(x) if out is None else _ring_vector(out, "out", x.shape[0], writeable=True)
    if result.dtype != x.dtype:
        raise FedkernTypeError(f"out has dtype {result.dtype}; expected {x.dtype}")
    if out is not None and out is not x:
        result[...] = x
    _mask_in_place(result, keys, signs, (), backend)
    return result


def _keystreams(keys: list[bytes], first_block: int) -> list:
    """AES-256-CTR encryptors of ``keys``, each at counter block ``first_block``."""
    crypto = _cryptography()
    counter = first_block.to_bytes(16, "big")
    return [crypto.Cipher(crypto.algorithms.AES(key), crypto.modes.CTR(counter)).encryptor() for key in keys]


def _mask_range(out: np.ndarray, keys: list[bytes], signs: np.ndarray, rows: Updates | None, j0: int, j1: int,
                add_masks_kernel) -> None:
    """out[j0:j1] += rows[:, j0:j1] + sum_m signs[m] PRG(keys[m])[j0:j1], chunk by chunk."""
    itemsize = out.itemsize
    chunk_bytes = _MASK_CHUNK * itemsize
    # each buffer row has a block's slack: OpenSSL's update_into asks for len(data) + 15 bytes
    buffer = np.empty((min(_MASK_GROUP, max(len(keys), 1)), chunk_bytes + 16), np.uint8)
    views = [buffer[r, :chunk_bytes].view(out.dtype) for r in range(buffer.shape[0])]
    zeros = memoryview(bytes(chunk_bytes))
    streams = _keystreams(keys, j0 * itemsize // 16)
    groups = [(g, min(g + _MASK_GROUP, len(keys))) for g in range(0, len(keys), _MASK_GROUP)]
    group_rows = [Updates(views[:g1 - g0], None) for g0, g1 in groups]
    for c0 in range(j0, j1, _MASK_CHUNK):
        n = min(_MASK_CHUNK, j1 - c0)
        target = out[c0:c0 + n]
        if rows is not None:
            add_masks_kernel(target, c0, rows, np.ones(rows.k, out.dtype))
        for (g0, g1), masks in zip(groups, group_rows):
            for m in range(g0, g1):
                streams[m].update_into(zeros[:n * itemsize], buffer[m - g0])
            add_masks_kernel(target, 0, masks, signs[g0:g1])


def _mask_in_place(out: np.ndarray, keys: list[bytes], signs: Sequence[int], rows: Sequence[np.ndarray],
                   backend: str | None) -> None:
    """out += sum of rows + sum_m signs[m] PRG(keys[m]) in the ring, over contiguous ranges
    of whole chunks, one per thread (ring sums are exact: any split gives the same bits)."""
    d = out.shape[0]
    ring_signs = np.array([1 if s == 1 else -1 for s in signs], np.int64).astype(out.dtype)
    row_view = Updates(list(rows), None) if len(rows) else None
    kernel = kernels("secagg", backend, "add_masks").add_masks
    nchunks = -(-d // _MASK_CHUNK)
    threads = max(1, min(get_num_threads(), nchunks))
    bounds = [min(d, (t * nchunks // threads) * _MASK_CHUNK) for t in range(threads + 1)]
    tasks = [(bounds[t], bounds[t + 1]) for t in range(threads)]
    if threads == 1:
        _mask_range(out, keys, ring_signs, row_view, 0, d, kernel)
        return
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(_mask_range, out, keys, ring_signs, row_view, a, b, kernel) for a, b in tasks]:
            future.result()


# --------------------------------------------------------------------------- Shamir secret sharing
@dataclass(frozen=True)
class Share:
    """One Shamir share: the point (x, y) of ``owner``'s secret of ``kind`` ("seed", the
    self-mask seed, or "key", the mask secret key) held by ``holder`` (x = holder + 1),
    for round ``round``."""

    owner: int
    holder: int
    round: int
    kind: str
    y: int

    @property
    def x(self) -> int:
        return self.holder + 1


def _field_element(entropy: _Entropy | None) -> int:
    if entropy is None:
        return secrets.randbelow(PRIME)
    return int.from_bytes(entropy(82), "big") % PRIME  # 656 bits mod a 521-bit prime: bias < 2^-134


def split_secret(secret: bytes, threshold: int, holders: Sequence[int], *, owner: int = 0, round: int = 0,
                 kind: str = "seed", entropy: _Entropy | None = None) -> list[Share]:
    r"""Split a 32-byte secret into Shamir t-of-n shares over GF(2^521 - 1).

    A random polynomial f of degree t - 1 with f(0) the secret; holder h gets f(h + 1)
    (Shamir, "How to share a secret", CACM 1979). Any t shares give the secret
    (:func:`combine_shares`); fewer are independent of it.

    Parameters
    ----------
    secret : 32 bytes
    threshold : t, 1 <= t <= len(holders)
    holders : distinct client ids >= 0
    owner, round, kind : bound into each share and checked when combining
    entropy : ``entropy(n) -> n bytes`` for the coefficients (default: ``secrets``); for
        reproducible tests only

    Examples
    --------
    >>> from fedkern import secagg
    >>> shares = secagg.split_secret(bytes(range(32)), 3, holders=[0, 1, 2, 3, 4])
    >>> secagg.combine_shares(shares[1:4], 3) == bytes(range(32))
    True
    """
    if not isinstance(secret, bytes) or len(secret) != _KEY_BYTES:
        raise FedkernTypeError(f"secret must be {_KEY_BYTES} bytes")
    holders = [check.count(h, "holders[i]") for h in holders]
    if len(set(holders)) != len(holders):
        raise FedkernValueError("holders must be distinct")
    threshold = check.count(threshold, "threshold", low=1, high=len(holders))
    if kind not in _SHARE_KINDS:
        raise FedkernValueError(f"kind must be one of {_SHARE_KINDS}; got {kind!r}")
    coefficients = [int.from_bytes(secret, "big")] + [_field_element(entropy) for _ in range(threshold - 1)]
    shares = []
    for h in holders:
        y = 0
        for c in reversed(coefficients):  # Horner at x = h + 1
            y = (y * (h + 1) + c) % PRIME
        shares.append(Share(owner, h, round, kind, y))
    return shares


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """l_i(0) = prod_{j != i} x_j / (x_j - x_i) mod p, one modular inverse for all (batched)."""
    numerators, denominators = [], []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        numerators.append(num)
        denominators.append(den)
    prefix = [1]
    for den in denominators:
        prefix.append(prefix[-1] * den % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    coefficients = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):  # inverse of denominators[i] from the prefix products
        coefficients[i] = numerators[i] * inverse * prefix[i] % PRIME
        inverse = inverse * denominators[i] % PRIME
    return tuple(coefficients)


def combine_shares(shares: Sequence[Share], threshold: int) -> bytes:
    r"""The secret of ``threshold`` or more Shamir shares, by Lagrange interpolation at 0.

    :math:`s = \sum_i y_i \prod_{j \ne i} x_j / (x_j - x_i) \bmod p` over t shares (the t of
    lowest holder id). All shares must be of one owner, round and kind, from distinct
    holders; fewer than t raise :class:`SecAggError` (they determine nothing).

    Examples
    --------
    >>> from fedkern import secagg
    >>> shares = secagg.split_secret(b"k" * 32, 2, holders=[0, 1, 2])
    >>> secagg.combine_shares([shares[0], shares[2]], 2)
    b'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'
    """
    threshold = check.count(threshold, "threshold", low=1)
    shares = list(shares)
    if not all(isinstance(share, Share) for share in shares):
        raise FedkernTypeError("shares must be Share objects")
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a secret of threshold {threshold}")
    origin = {(share.owner, share.round, share.kind) for share in shares}
    if len(origin) != 1:
        raise SecAggError(f"shares of different secrets (owner, round, kind) mixed: {sorted(origin)}")
    if len({share.holder for share in shares}) != len(shares):
        raise SecAggError("two shares of one holder")
    chosen = sorted(shares, key=lambda share: share.holder)[:threshold]
    lagrange = _lagrange_at_zero(tuple(share.x for share in chosen))
    secret = sum(share.y * l for share, l in zip(chosen, lagrange)) % PRIME
    if secret >= 2 ** (8 * _KEY_BYTES):
        raise SecAggError("the shares are inconsistent: they interpolate to no 32-byte secret")
    return secret.to_bytes(_KEY_BYTES, "big")


# --------------------------------------------------------------------------- the protocol
@dataclass(frozen=True)
class SecAggConfig:
    r"""The public parameters of one secure aggregation round, fixed before anything is sent.

    Parameters
    ----------
    n_clients : clients, with ids 0 .. n_clients - 1
    threshold : t, the shares needed to rebuild a secret, and the fewest survivors of any
        phase; at most the size of a neighbourhood (n_clients, or neighbours + 1)
    dim : D, the coordinates of an update
    clip, levels : the fixed-point encoding (:func:`ring_quantize`): c and Q
    bits : the ring, 32 or 64; ``n_clients * levels * max_weight < 2**bits`` is checked here
    max_weight : the largest integer weight a client may give its update
    neighbours : None for the full graph (Bonawitz et al.), or k for SecAgg+'s k-regular
        graph (a Harary graph on a permutation drawn from ``graph_seed``)
    round : the round id, bound into every key, mask and share

    Examples
    --------
    >>> from fedkern import secagg
    >>> config = secagg.SecAggConfig(n_clients=20, threshold=4, dim=10, neighbours=6)
    >>> len(config.neighbours_of(0))
    6
    """

    n_clients: int
    threshold: int
    dim: int
    clip: float = 1.0
    levels: int = 2**16
    bits: int = 32
    max_weight: int = 1
    neighbours: int | None = None
    round: int = 0
    graph_seed: int = 0

    def __post_init__(self) -> None:
        n = check.count(self.n_clients, "n_clients", low=2)
        check.count(self.dim, "dim", low=1)
        check.real(self.clip, "clip", low=0.0, low_inclusive=False)
        check.count(self.levels, "levels", low=1)
        _ring_dtype(self.bits)
        check.count(self.max_weight, "max_weight", low=1)
        check.count(self.round, "round", high=2**64 - 1)
        check.count(self.graph_seed, "graph_seed", high=2**64 - 1)
        if self.neighbours is not None:
            k = check.count(self.neighbours, "neighbours", low=1, high=n - 1)
            if k % 2 and n % 2:
                raise FedkernValueError(f"no {k}-regular graph on {n} clients (k and n both odd)")
        check.count(self.threshold, "threshold", low=1, high=n if self.neighbours is None else self.neighbours + 1,
                    why=" (the size of a neighbourhood)")
        _check_ring_holds(n, self.levels, self.max_weight, self.bits)

    @property
    def dtype(self) -> np.dtype:
        return RING_DTYPES[self.bits]

    @functools.cached_property
    def _graph(self) -> tuple[frozenset, ...]:
        n, k = self.n_clients, self.neighbours
        if k is None:
            return tuple(frozenset(range(n)) - {u} for u in range(n))
        # Harary graph H(k, n): position p is joined to p +- 1 .. p +- k // 2 (and p + n/2 for odd k)
        order = np.random.default_rng(self.graph_seed).permutation(n)
        position = np.argsort(order)
        offsets = list(range(1, k // 2 + 1)) + list(range(-(k // 2), 0)) + ([n // 2] if k % 2 else [])
        return tuple(frozenset(int(order[(position[u] + o) % n]) for o in offsets) for u in range(n))

    def neighbours_of(self, client: int) -> frozenset:
        """The clients ``client`` masks with and shares its secrets with."""
        return self._graph[client]

    def holders_of(self, client: int) -> frozenset:
        """Who holds shares of ``client``'s secrets: its neighbours and itself."""
        return self._graph[client] | {client}


@dataclass(frozen=True)
class PublicKeys:
    """Phase 1, client -> server -> neighbours: the X25519 public keys of ``client`` for
    encrypting shares (``cipher_key``) and for pairwise masks (``mask_key``)."""

    client: int
    round: int
    cipher_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class EncryptedShares:
    """Phase 2, client -> server: ``owner``'s shares, one AES-GCM ciphertext per holder,
    and a commitment (SHA-256) to its self-mask seed."""

    owner: int
    round: int
    commitment: bytes
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Phase 3, client -> server: the masked ring vector (D + 1 words, the last the weight)."""

    client: int
    round: int
    vector: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Phase 4, server -> survivors: who sent a masked input (their self-mask seeds are
    asked for) and who dropped after sharing (their mask keys are asked for)."""

    round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


def _ids(*values: int) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


def _hkdf(material: bytes, label: bytes, *ids: int) -> bytes:
    """HKDF-SHA256 of ``material``, with the purpose, round and client ids bound in ``info``."""
    crypto = _cryptography()
    info = b"fedkern-secagg/" + label + _ids(*ids)
    return crypto.HKDF(algorithm=crypto.hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(material)


def _agree(private, public: bytes) -> bytes:
    crypto = _cryptography()
    return private.exchange(crypto.X25519PublicKey.from_public_bytes(public))


def _commit(round_id: int, owner: int, seed: bytes) -> bytes:
    return hashlib.sha256(b"fedkern-secagg/commit" + _ids(round_id, owner) + seed).digest()


def _pair_sign(u: int, v: int) -> int:
    """The sign of u's mask with v: the pair's two masks cancel in the sum."""
    return 1 if u < v else -1


def _public_bytes(private) -> bytes:
    return private.public_key().public_bytes_raw()


_FIELD_BYTES = 66  # a GF(2^521 - 1) element


class Client:
    """One client's side of a secure aggregation round (one object per client and round).

    Call, in order, :meth:`advertise_keys`, :meth:`share_keys`, :meth:`masked_input` and
    :meth:`unmask`, each with what the server relayed; a client may drop out at any point
    (simply stop calling). Its secret keys and seed never leave it except as shares.

    Parameters
    ----------
    client_id : int in [0, config.n_clients)
    config : :class:`SecAggConfig`
    entropy : ``entropy(n) -> n bytes``, default ``os.urandom``; a seeded source makes
        tests reproducible and must never be used otherwise

    Examples
    --------
    >>> from fedkern import secagg
    >>> config = secagg.SecAggConfig(n_clients=3, threshold=2, dim=2)
    >>> clients = [secagg.Client(i, config) for i in range(3)]
    >>> server = secagg.Server(config)
    >>> keys = server.receive_keys([c.advertise_keys() for c in clients])
    >>> routed = server.receive_shares([c.share_keys(keys[c.client_id]) for c in clients])
    >>> request = server.receive_masked([c.masked_input(np.full(2, 0.5), routed[c.client_id])
    ...                                  for c in clients[:2]])            # client 2 drops
    >>> total = server.unmask({c.client_id: c.unmask(request) for c in clients[:2]})
    >>> server.sum().round(3)
    array([1., 1.])
    """

    def __init__(self, client_id: int, config: SecAggConfig, *, entropy: _Entropy | None = None):
        if not isinstance(config, SecAggConfig):
            raise FedkernTypeError(f"config must be a SecAggConfig; got {type(config).__name__}")
        self.client_id = check.count(client_id, "client_id", high=config.n_clients - 1)
        self.config = config
        self._entropy = entropy or os.urandom
        crypto = _cryptography()
        self._cipher_sk = crypto.X25519PrivateKey.from_private_bytes(self._entropy(_KEY_BYTES))
        self._mask_sk_bytes = self._entropy(_KEY_BYTES)
        self._mask_sk = crypto.X25519PrivateKey.from_private_bytes(self._mask_sk_bytes)
        self._phase = 0
        self._keys: dict[int, PublicKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}   # owner -> (seed share y, key share y)
        self._revealed: dict[int, str] = {}

    def _enter(self, phase: int, name: str) -> None:
        if self._phase != phase:
            raise SecAggError(f"client {self.client_id}: {name} called out of order (phase {self._phase})")
        self._phase = phase + 1

    def advertise_keys(self) -> PublicKeys:
        """Phase 1: this client's two public keys."""
        self._enter(0, "advertise_keys")
        return PublicKeys(self.client_id, self.config.round, _public_bytes(self._cipher_sk),
                          _public_bytes(self._mask_sk))

    def _share_key(self, owner: int, holder: int, other: int) -> bytes:
        shared = _agree(self._cipher_sk, self._keys[other].cipher_key)
        return _hkdf(shared, b"share", self.config.round, owner, holder)

    def share_keys(self, keys: Mapping[int, PublicKeys]) -> EncryptedShares:
        """Phase 2: from the neighbours' public keys, shares of the seed and the mask key.

        Raises :class:`SecAggError` when fewer than t - 1 neighbours advertised keys, a
        key is of another client or round, or two clients have the same key.
        """
        self._enter(1, "share_keys")
        u, config = self.client_id, self.config
        for v, message in keys.items():
            if v == u:
                continue
            if v not in config.neighbours_of(u) or not isinstance(message, PublicKeys) or message.client != v:
                raise SecAggError(f"client {u}: public keys of client {v} are not of a neighbour")
            if message.round != config.round:
                raise SecAggError(f"client {u}: public keys of client {v} are of round {message.round}")
            self._keys[v] = message
        all_keys = [k.cipher_key for k in self._keys.values()] + [k.mask_key for k in self._keys.values()]
        all_keys += [_public_bytes(self._cipher_sk), _public_bytes(self._mask_sk)]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError(f"client {u}: two public keys are equal")
        holders = sorted(set(self._keys) | {u})
        if len(holders) < config.threshold:
            raise SecAggError(f"client {u}: {len(holders)} clients left in its neighbourhood, fewer than "
                              f"the threshold {config.threshold}")
        self._seed = self._entropy(_KEY_BYTES)
        seed_shares = split_secret(self._seed, config.threshold, holders, owner=u, round=config.round,
                                   kind="seed", entropy=self._entropy)
        key_shares = split_secret(self._mask_sk_bytes, config.threshold, holders, owner=u, round=config.round,
                                  kind="key", entropy=self._entropy)
        ciphertexts = {}
        aesgcm = _cryptography().AESGCM
        for seed_share, key_share in zip(seed_shares, key_shares):
            v = seed_share.holder
            plaintext = _ids(config.round, u, v) + seed_share.y.to_bytes(_FIELD_BYTES, "big") \
                + key_share.y.to_bytes(_FIELD_BYTES, "big")
            if v == u:
                self._held[u] = (seed_share.y, key_share.y)
            else:
                ciphertexts[v] = aesgcm(self._share_key(u, v, v)).encrypt(bytes(12), plaintext, _ids(config.round, u, v))
        return EncryptedShares(u, config.round, _commit(config.round, u, self._seed), ciphertexts)

    def _receive(self, owner: int, ciphertext: bytes) -> None:
        u, config = self.client_id, self.config
        if owner not in self._keys:
            raise SecAggError(f"client {u}: a share from client {owner}, which is not a neighbour with keys")
        crypto = _cryptography()
        header = _ids(config.round, owner, u)
        try:
            plaintext = crypto.AESGCM(self._share_key(owner, u, owner)).decrypt(bytes(12), ciphertext, header)
        except (crypto.InvalidTag, TypeError, ValueError) as error:
            raise SecAggError(f"client {u}: the share from client {owner} does not decrypt: of another client, "
                              f"holder or round, or altered") from error
        if len(plaintext) != 24 + 2 * _FIELD_BYTES or plaintext[:24] != header:
            raise SecAggError(f"client {u}: the share from client {owner} is not for this holder and round")
        body = plaintext[24:]
        self._held[owner] = (int.from_bytes(body[:_FIELD_BYTES], "big"), int.from_bytes(body[_FIELD_BYTES:], "big"))

    def masked_input(self, update: np.ndarray, shares: Mapping[int, bytes], *, weight: int = 1,
                     seed: int | None = None, backend: str | None = None) -> MaskedInput:
        """Phase 3: store the neighbours' shares, then quantise, weight and mask the update.

        Parameters
        ----------
        update : (D,) float32 or float64 array, finite
        shares : owner -> ciphertext, what the server relayed to this client
        weight : int in [0, config.max_weight]
        seed : the stochastic rounding's seed (default: drawn from the client's entropy)
        """
        self._enter(2, "masked_input")
        u, config = self.client_id, self.config
        update = check.vector(update, "update", length=config.dim)
        weight = check.count(weight, "weight", high=config.max_weight)
        for owner, ciphertext in shares.items():
            self._receive(owner, ciphertext)
        partners = sorted(set(self._held) - {u})
        if len(partners) + 1 < config.threshold:
            raise SecAggError(f"client {u}: shares from {len(partners)} neighbours, fewer than threshold - 1 = "
                              f"{config.threshold - 1}")
        if seed is None:
            seed = int.from_bytes(self._entropy(8), "little")
        vector = np.empty(config.dim + 1, config.dtype)
        ring_quantize(update, config.clip, config.levels, seed, weight=weight, out=vector[:config.dim], backend=backend)
        vector[config.dim] = weight
        keys = [_hkdf(self._seed, b"self", config.round, u)]
        keys += [_hkdf(_agree(self._mask_sk, self._keys[v].mask_key), b"mask", config.round, min(u, v), max(u, v))
                 for v in partners]
        _mask_in_place(vector, keys, [1] + [_pair_sign(u, v) for v in partners], (), backend)
        return MaskedInput(u, config.round, vector)

    def unmask(self, request: UnmaskRequest) -> list[Share]:
        """Phase 4: shares of the survivors' seeds and of the dropped clients' mask keys.

        Raises :class:`SecAggError` (the double-masking invariant) when a client is both a
        survivor and dropped, or of the other kind than an earlier request said, when this
        client is listed as dropped, or when fewer than t survived.
        """
        if self._phase < 3:
            raise SecAggError(f"client {self.client_id}: unmask called before masked_input")
        u, config = self.client_id, self.config
        if not isinstance(request, UnmaskRequest) or request.round != config.round:
            raise SecAggError(f"client {u}: the unmask request is not of round {config.round}")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggError(f"client {u}: clients {sorted(survivors & dropped)} are asked for as survivors and "
                              f"as dropped: their seeds and mask keys together would unmask their inputs")
        if u not in survivors:
            raise SecAggError(f"client {u}: the request does not list it as a survivor")
        if len(survivors) < config.threshold:
            raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {config.threshold}")
        wanted = {v: "seed" for v in survivors} | {v: "key" for v in dropped}
        conflicts = [v for v, kind in wanted.items() if self._revealed.get(v, kind) != kind]
        if conflicts:
            raise SecAggError(f"client {u}: already revealed the other secret of clients {conflicts}")
        result = []
        for owner, kind in sorted(wanted.items()):
            if owner in self._held:
                self._revealed[owner] = kind
                result.append(Share(owner, u, config.round, kind, self._held[owner][_SHARE_KINDS.index(kind)]))
        return result


class Server:
    """The server's side of a secure aggregation round: relays messages, tracks who dropped
    at each phase, and removes the masks from the sum of the masked inputs.

    Call :meth:`receive_keys`, :meth:`receive_shares`, :meth:`receive_masked` and
    :meth:`unmask` with what the clients still online sent; then :meth:`sum` or
    :meth:`mean`, or read :attr:`total` (the ring sum of the weighted quantised updates)
    and :attr:`total_weight`. An example is under :class:`Client`.

    The server never holds both the seed and the mask key of one client: it asks for seeds
    of the clients whose masked input arrived and for mask keys of the others, and raises
    :class:`SecAggError` if a share of the other kind would be used.
    """

    def __init__(self, config: SecAggConfig, *, backend: str | None = None):
        if not isinstance(config, SecAggConfig):
            raise FedkernTypeError(f"config must be a SecAggConfig; got {type(config).__name__}")
        self.config = config
        self.backend = backend
        self._phase = 0
        self._keys: dict[int, PublicKeys] = {}
        self._commitments: dict[int, bytes] = {}
        self._inputs: dict[int, np.ndarray] = {}
        self._asked: dict[int, str] = {}
        self.total: np.ndarray | None = None
        self.total_weight: int | None = None

    def _enter(self, phase: int, name: str) -> None:
        if self._phase != phase:
            raise SecAggError(f"server: {name} called out of order (phase {self._phase})")
        self._phase = phase + 1

    def _senders(self, messages: Iterable, kind: type, attribute: str, allowed: Iterable[int], what: str) -> dict:
        """The messages by sender; each of ``kind``, this round, from an allowed client, once."""
        allowed, by_sender = set(allowed), {}
        for message in messages:
            if not isinstance(message, kind):
                raise FedkernTypeError(f"{what}: expected {kind.__name__} messages; got {type(message).__name__}")
            sender = getattr(message, attribute)
            if message.round != self.config.round:
                raise SecAggError(f"{what}: a message of client {sender} is of round {message.round}, "
                                  f"not {self.config.round}")
            if sender not in allowed:
                raise SecAggError(f"{what}: client {sender} is not expected in this phase")
            if sender in by_sender:
                raise SecAggError(f"{what}: two messages of client {sender}")
            by_sender[sender] = message
        if len(by_sender) < self.config.threshold:
            raise SecAggError(f"{what}: {len(by_sender)} clients left, fewer than the threshold "
                              f"{self.config.threshold}")
        return by_sender

    def receive_keys(self, messages: Iterable[PublicKeys]) -> dict[int, dict[int, PublicKeys]]:
        """Phase 1: the advertised keys; returns, per client, its neighbours' keys to relay."""
        self._enter(0, "receive_keys")
        self._keys = self._senders(messages, PublicKeys, "client", range(self.config.n_clients), "receive_keys")
        return {u: {v: self._keys[v] for v in self.config.neighbours_of(u) if v in self._keys} for u in self._keys}

    def receive_shares(self, messages: Iterable[EncryptedShares]) -> dict[int, dict[int, bytes]]:
        """Phase 2: the encrypted shares; returns, per holder, owner -> ciphertext to relay."""
        self._enter(1, "receive_shares")
        by_owner = self._senders(messages, EncryptedShares, "owner", self._keys, "receive_shares")
        routed: dict[int, dict[int, bytes]] = {u: {} for u in by_owner}
        for owner, message in by_owner.items():
            for holder, ciphertext in message.ciphertexts.items():
                if holder not in self.config.neighbours_of(owner) or holder not in self._keys:
                    raise SecAggError(f"receive_shares: client {owner} sent a share for {holder}, not a neighbour")
                if holder in routed:   # holders that dropped in this phase get nothing
                    routed[holder][owner] = ciphertext
            self._commitments[owner] = message.commitment
        return routed

    def receive_masked(self, messages: Iterable[MaskedInput]) -> UnmaskRequest:
        """Phase 3: the masked inputs; returns the request for phase 4 to send the survivors.

        Raises :class:`fedkern.FedkernTypeError` / :class:`fedkern.FedkernValueError` for a
        vector of the wrong dtype or length, naming its client.
        """
        self._enter(2, "receive_masked")
        by_client = self._senders(messages, MaskedInput, "client", self._commitments, "receive_masked")
        for u, message in by_client.items():
            _ring_vector(message.vector, f"the masked input of client {u}", self.config.dim + 1)
            if message.vector.dtype != self.config.dtype:
                raise FedkernTypeError(f"the masked input of client {u} has dtype {message.vector.dtype}; "
                                       f"the round's ring is {self.config.dtype}")
            self._inputs[u] = message.vector
        survivors = tuple(sorted(by_client))
        dropped = tuple(sorted(set(self._commitments) - set(by_client)))
        for u in survivors:
            self._ask(u, "seed")
        for u in dropped:
            self._ask(u, "key")
        return UnmaskRequest(self.config.round, survivors, dropped)

    def _ask(self, owner: int, kind: str) -> None:
        """Record which secret of ``owner`` the server learns; never both (double masking)."""
        if self._asked.setdefault(owner, kind) != kind:
            raise SecAggError(f"server: asking for the {kind} of client {owner}, whose "
                              f"{self._asked[owner]} it already asked for, would unmask its input")

    def _collect(self, responses: Mapping[int, Sequence[Share]]) -> dict[int, list[Share]]:
        by_owner: dict[int, list[Share]] = {u: [] for u in self._asked}
        for holder, shares in responses.items():
            if holder not in self._inputs:
                raise SecAggError(f"unmask: client {holder} sent no masked input and cannot answer")
            for share in shares:
                if not isinstance(share, Share):
                    raise FedkernTypeError(f"unmask: client {holder} sent a {type(share).__name__}, not a Share")
                if share.holder != holder or share.round != self.config.round:
                    raise SecAggError(f"unmask: client {holder} sent a share of holder {share.holder}, round "
                                      f"{share.round}")
                if share.owner not in self._asked or holder not in self.config.holders_of(share.owner):
                    raise SecAggError(f"unmask: client {holder} sent a share of client {share.owner}, "
                                      f"which it cannot hold or was not asked for")
                self._ask(share.owner, share.kind)
                by_owner[share.owner].append(share)
        return by_owner

    def _secret(self, owner: int, shares: list[Share]) -> bytes:
        t = self.config.threshold
        if len(shares) < t:
            raise SecAggError(f"unmask: {len(shares)} shares of client {owner}'s {self._asked[owner]}, fewer "
                              f"than the threshold {t}: the sum cannot be unmasked")
        secret = combine_shares(shares, t)
        if self._asked[owner] == "seed":
            ok = _commit(self.config.round, owner, secret) == self._commitments[owner]
        else:
            private = _cryptography().X25519PrivateKey.from_private_bytes(secret)
            ok = _public_bytes(private) == self._keys[owner].mask_key
        if not ok:
            raise SecAggError(f"unmask: the shares of client {owner} rebuild a {self._asked[owner]} that does not "
                              f"match what it committed to")
        return secret

    def unmask(self, responses: Mapping[int, Sequence[Share]]) -> np.ndarray:
        """Phase 4: rebuild the secrets, remove the masks; returns :attr:`total`.

        ``responses`` maps each answering survivor to its shares (survivors that dropped
        in this phase are simply absent). Raises :class:`SecAggError` when a secret has
        fewer than t shares, a share is of another client, holder, round or kind, or the
        masks do not cancel.
        """
        self._enter(3, "unmask")
        config, round_id = self.config, self.config.round
        secrets_ = {owner: self._secret(owner, shares) for owner, shares in self._collect(responses).items()}
        keys, signs = [], []
        for u in self._inputs:
            keys.append(_hkdf(secrets_[u], b"self", round_id, u))
            signs.append(-1)
        crypto = _cryptography()
        for v in (v for v, kind in self._asked.items() if kind == "key"):
            private = crypto.X25519PrivateKey.from_private_bytes(secrets_[v])
            for u in sorted(config.neighbours_of(v) & set(self._inputs)):
                shared = _agree(private, self._keys[u].mask_key)
                keys.append(_hkdf(shared, b"mask", round_id, min(u, v), max(u, v)))
                signs.append(-_pair_sign(u, v))
        total = np.zeros(config.dim + 1, config.dtype)
        _mask_in_place(total, keys, signs, list(self._inputs.values()), self.backend)
        weight = int(total[config.dim])
        if weight > len(self._inputs) * config.max_weight:
            raise SecAggError(f"unmask: the weights sum to {weight}, more than {len(self._inputs)} clients can "
                              f"give: the masks did not cancel")
        self.total, self.total_weight = total[:config.dim], weight
        return self.total

    def sum(self, dtype=np.float64) -> np.ndarray:
        r"""The decoded weighted sum :math:`\sum_u w_u \hat x_u` of the survivors (after :meth:`unmask`)."""
        if self.total is None:
            raise SecAggError("server: sum() before unmask()")
        return ring_dequantize(self.total, self.config.clip, self.config.levels, dtype=dtype, backend=self.backend)

    def mean(self, dtype=np.float64) -> np.ndarray:
        """The decoded weighted mean: :meth:`sum` divided by the sum of the weights."""
        total = self.sum(dtype)
        if self.total_weight == 0:
            raise SecAggError("server: every surviving client gave weight 0; there is no mean")
        return (total / self.total_weight).astype(dtype, copy=False)

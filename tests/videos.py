"""Small, deterministic test videos: good ones, rotated, variable frame rate, broken.

Plain functions, no pytest fixtures. Everything is written with PyAV (no ffmpeg binary needed)
except `ffmpeg_decode_upright`, which uses the binary shipped by `imageio-ffmpeg` as an
independent reference decoder.

Rotation convention used here: `rotation_degrees` is the *clockwise* angle a player turns the
stored frames by to show them upright, i.e. the legacy `rotate` tag of phone videos
(an iPhone portrait clip stores landscape frames with rotate=90). FFmpeg's display matrix and
PyAV's `VideoFrame.rotation` count counter-clockwise, so `frame.rotation == -rotation_degrees`
(normalised to [-180, 180]).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import av
import numpy as np

# ---------------------------------------------------------------------------------------------
# frame content


def _wave(x: np.ndarray, y: np.ndarray, fx: float, fy: float, phase: float) -> np.ndarray:
    """sin(2*pi*(fx*x + fy*y + phase)) on the grid, as a sum of outer products (fast)."""
    ax, by = 2 * np.pi * (fx * x + phase), 2 * np.pi * fy * y
    return np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))


def gradient_frame(index: int, width: int, height: int) -> np.ndarray:
    """One smooth frame [H, W, 3] uint8 that differs from every other frame index.

    Three sinusoidal gradients drift at incommensurate speeds, so no two of the first few
    thousand frames are alike, and the content is smooth enough that H.264 and a bicubic
    resize keep it within a few levels (preprocessing comparisons stay meaningful)."""
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    t = float(index)
    r = 0.5 + 0.4 * _wave(x, y, 1.0, 0.3, 0.031 * t)
    g = 0.5 + 0.4 * _wave(x, y, -0.2, 1.3, -0.047 * t)
    b = 0.5 + 0.4 * np.cos(2 * np.pi * 0.011 * t) * _wave(x, y, 0.7, 0.7, 0.019 * t)
    return (np.stack([r, g, b], axis=-1) * 255 + 0.5).astype(np.uint8)  # values stay in [25, 230]


def make_frames(num_frames: int, width: int, height: int, pattern: str = "gradient") -> np.ndarray:
    """Deterministic frames [N, H, W, 3] uint8. Patterns: "gradient" (smooth, default) or
    "noise" (seeded uniform noise: hard for the codec, for stress only)."""
    if pattern == "gradient":
        return np.stack([gradient_frame(i, width, height) for i in range(num_frames)])
    if pattern == "noise":
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)
    raise ValueError(f"unknown pattern {pattern!r}")


def upright_frames(stored: np.ndarray, rotation_degrees: int) -> np.ndarray:
    """Turn stored frames [..., H, W, 3] upright for a clockwise `rotation_degrees` tag."""
    k = -(int(rotation_degrees) // 90)  # np.rot90 turns counter-clockwise for positive k
    return np.ascontiguousarray(np.rot90(stored, k=k, axes=(-3, -2)))


# ---------------------------------------------------------------------------------------------
# encoding


def _encode(
    path: str | Path,
    frames: Iterable[np.ndarray],
    *,
    fps: float,
    codec: str = "libx264",
    pts_seconds: Sequence[float] | None = None,
    ccw_display_rotation: int = 0,
    gop: int = 12,
    crf: int = 18,
    faststart: bool = False,
) -> Path:
    """Encode uint8 RGB frames into an mp4. Every writer in this file goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)  # 30000/1001 stays exact
    # 1/90000 (the MPEG clock) can hold any test timestamp; CFR videos just use 1/fps.
    time_base = Fraction(1, 90000) if pts_seconds is not None else 1 / rate
    options = {"movflags": "faststart"} if faststart else {}
    container = av.open(str(path), mode="w", options=options)
    try:
        stream = None
        for i, frame in enumerate(frames):
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if stream is None:  # size is only known once the first frame arrives
                h, w = frame.shape[:2]
                if h % 2 or w % 2:
                    raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.time_base = time_base
                stream.codec_context.time_base = time_base
                stream.codec_context.gop_size = gop  # short GOP: seeking is really exercised
                if codec == "libx264":
                    stream.options = {"crf": str(crf), "preset": "veryfast"}
                elif codec == "libsvtav1":
                    stream.options = {"crf": str(crf + 10), "preset": "11"}
                if ccw_display_rotation:
                    # writes the tkhd display matrix; metadata['rotate'] is ignored by FFmpeg 8
                    stream.set_display_rotation(ccw_display_rotation)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if pts_seconds is None:
                video_frame.pts = i  # in units of 1/fps
            else:
                video_frame.pts = round(pts_seconds[i] / time_base)
            video_frame.time_base = time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to encode")
        for packet in stream.encode():  # flush delayed (B-)frames
            container.mux(packet)
    finally:
        container.close()
    return path


def write_mp4(
    path: str | Path,
    frames: Iterable[np.ndarray] | None = None,
    *,
    num_frames: int = 24,
    width: int = 160,
    height: int = 96,
    fps: float = 30,
    codec: str = "libx264",
    pattern: str = "gradient",
    gop: int = 12,
    crf: int = 18,
    faststart: bool = False,
) -> Path:
    """Write an H.264 yuv420p mp4 (B-frames on, GOP 12, crf 18).

    `frames`: uint8 [H, W, 3] RGB arrays; if None, `make_frames(num_frames, width, height,
    pattern)` is used. `fps` may be fractional (29.97 is stored as 2997/100, 30000/1001 as is)."""
    if frames is None:
        frames = make_frames(num_frames, width, height, pattern)
    return _encode(path, frames, fps=fps, codec=codec, gop=gop, crf=crf, faststart=faststart)


def write_rotated_mp4(
    path: str | Path,
    rotation_degrees: int,
    frames: Iterable[np.ndarray] | None = None,
    *,
    num_frames: int = 24,
    width: int = 96,
    height: int = 160,
    fps: float = 30,
    codec: str = "libx264",
    pattern: str = "gradient",
) -> Path:
    """Write a phone-style mp4: a player turns the stored frames clockwise by
    `rotation_degrees` (90, 180 or 270) to show `frames`.

    `frames` (and `width` x `height`, portrait by default) describe the UPRIGHT video, the one a
    viewer sees and a correct reader returns; the file stores them turned the other way
    (landscape for 90/270) and carries the rotation in the tkhd display matrix.
    Reference: `make_frames(num_frames, width, height, pattern)` are the upright frames."""
    if rotation_degrees % 90 or rotation_degrees % 360 == 0:
        raise ValueError(f"rotation must be 90, 180 or 270, got {rotation_degrees}")
    rotation_degrees %= 360
    if frames is None:
        frames = make_frames(num_frames, width, height, pattern)
    stored = (np.ascontiguousarray(np.rot90(f, k=rotation_degrees // 90)) for f in frames)
    ccw = -rotation_degrees if rotation_degrees != 270 else 90  # keep in [-180, 180]
    return _encode(path, stored, fps=fps, codec=codec, ccw_display_rotation=ccw)


def write_vfr_mp4(
    path: str | Path,
    pts_seconds: Sequence[float],
    frames: Iterable[np.ndarray] | None = None,
    *,
    width: int = 160,
    height: int = 96,
    codec: str = "libx264",
    pattern: str = "gradient",
) -> Path:
    """Write a variable-frame-rate mp4 whose frame i is shown at `pts_seconds[i]` (strictly
    increasing; time base 1/90000). The nominal rate given to the encoder is the mean rate."""
    pts = [float(t) for t in pts_seconds]
    if len(pts) < 2 or any(b <= a for a, b in zip(pts, pts[1:])):
        raise ValueError("need >= 2 strictly increasing timestamps")
    if frames is None:
        frames = make_frames(len(pts), width, height, pattern)
    mean_fps = (len(pts) - 1) / (pts[-1] - pts[0])
    return _encode(path, frames, fps=mean_fps, codec=codec, pts_seconds=pts)


def write_av1_mp4(
    path: str | Path,
    frames: Iterable[np.ndarray] | None = None,
    *,
    num_frames: int = 12,
    width: int = 160,
    height: int = 96,
    fps: float = 30,
) -> Path | None:
    """Write an AV1 mp4 if PyAV has an AV1 encoder, else return None.

    Useful as a "valid file that some decoders cannot read": decord's bundled FFmpeg 4.1 has
    no software AV1 decoder, PyAV's FFmpeg has libdav1d."""
    for codec in ("libsvtav1", "libaom-av1", "librav1e"):
        try:
            av.codec.Codec(codec, "w")
        except Exception:
            continue
        if frames is None:
            frames = make_frames(num_frames, width, height)
        old = os.environ.get("SVT_LOG")
        os.environ["SVT_LOG"] = "1"  # SVT-AV1 prints ~25 banner lines to stderr otherwise
        try:
            return _encode(path, frames, fps=fps, codec=codec)
        finally:
            if old is None:
                os.environ.pop("SVT_LOG", None)
            else:
                os.environ["SVT_LOG"] = old
    return None


# ---------------------------------------------------------------------------------------------
# broken inputs


def write_zero_byte(path: str | Path) -> Path:
    """An empty file named like a video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_truncated_mp4(path: str | Path, fraction: float = 0.4, *, faststart: bool = False) -> Path:
    """A valid mp4 cut to `fraction` of its bytes.

    faststart=False (default): the moov index sits at the end and is lost, so opening fails.
    faststart=True: the index survives, so the file opens and claims all its frames, but the
    sample data of the later frames is missing (fails, or misbehaves, only while decoding)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".full.mp4")
    write_mp4(tmp, num_frames=48, faststart=faststart)
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_text_as_mp4(path: str | Path, text: str = "this is not a video\n" * 20) -> Path:
    """A text file with a video extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# reference decoders


def pyav_decode_upright(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode every frame with PyAV, turned upright by its display matrix.

    Returns frames [N, H, W, 3] uint8 and their timestamps in seconds [N]."""
    frames, times = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            rgb = frame.to_ndarray(format="rgb24")
            frames.append(np.rot90(rgb, k=round((frame.rotation or 0) / 90)))  # ccw angle
            times.append(float(frame.time))
    return np.ascontiguousarray(np.stack(frames)), np.asarray(times)


def ffmpeg_decode_upright(path: str | Path) -> np.ndarray:
    """Decode every frame with the ffmpeg binary of imageio-ffmpeg (which applies the display
    matrix by default) to rgb24. Returns [N, H, W, 3] uint8, H x W upright.

    Needs `imageio-ffmpeg` (tests: `pytest.importorskip("imageio_ffmpeg")`)."""
    import imageio_ffmpeg

    with av.open(str(path)) as container:  # size and rotation, to know the output shape
        frame = next(container.decode(video=0))
        w, h, rotation = frame.width, frame.height, frame.rotation or 0
    if rotation % 180:
        w, h = h, w
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-an",
        "-fps_mode", "passthrough",  # one output frame per decoded frame, also for VFR
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    if len(out) % (w * h * 3):
        raise RuntimeError(f"ffmpeg returned {len(out)} bytes, not a multiple of {w}x{h}x3")
    return np.frombuffer(out, np.uint8).reshape(-1, h, w, 3).copy()


# ---------------------------------------------------------------------------------------------
# a corpus of containers and codecs, made by the ffmpeg program


@dataclass(frozen=True)
class CorpusSpec:
    """One file of the corpus: `ffmpeg <source> <args> name`, from `source` (a lavfi test pattern of
    `frames` frames at `size`, 25 fps) or, with `derive_from`, from another corpus file."""

    name: str
    args: tuple[str, ...]
    encoder: str = ""  # needed encoder (the case is skipped, with a reason, when the build lacks it)
    size: str = "160x120"
    frames: int = 40
    derive_from: str = ""  # a corpus file this one is made from (stream copy); its args follow `-i`
    input_args: tuple[str, ...] = ()  # options before `-i` (of the derived-from file)
    about: str = ""


_H264 = ("-c:v", "libx264", "-bf", "3", "-g", "12", "-pix_fmt", "yuv420p")
CORPUS: tuple[CorpusSpec, ...] = (
    CorpusSpec("h264_bframes.ts", _H264, "libx264", about="H.264 with B-frames in MPEG-TS"),
    CorpusSpec("h264_bframes.mts", (*_H264, "-f", "mpegts"), "libx264", about="AVCHD-style .mts"),
    CorpusSpec("h264_bframes.m2ts", (*_H264, "-f", "mpegts", "-mpegts_m2ts_mode", "1"), "libx264",
               about="Blu-ray style .m2ts (192-byte packets)"),
    CorpusSpec("h264_bframes.mkv", _H264, "libx264", about="H.264 with B-frames in Matroska"),
    CorpusSpec("h264.mov", _H264, "libx264"),
    CorpusSpec("h264.m4v", _H264, "libx264"),
    CorpusSpec("h264.flv", ("-c:v", "libx264", "-pix_fmt", "yuv420p"), "libx264"),
    CorpusSpec("h264.f4v", ("-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4"), "libx264"),
    CorpusSpec("open_gop.mp4", (*_H264, "-x264-params", "open-gop=1:keyint=12"), "libx264", about="open GOPs"),
    CorpusSpec("open_gop.ts", (*_H264, "-x264-params", "open-gop=1:keyint=12"), "libx264"),
    CorpusSpec("vfr.mkv", ("-vf", r"setpts=PTS+if(gte(N\,15)\,0.5/TB\,0)+if(gte(N\,30)\,1.3/TB\,0)",
                           "-fps_mode", "passthrough", *_H264), "libx264", about="variable frame rate (gaps)"),
    CorpusSpec("vfr.mp4", ("-vf", r"setpts=PTS+if(gte(N\,15)\,0.5/TB\,0)+if(gte(N\,30)\,1.3/TB\,0)",
                           "-fps_mode", "passthrough", *_H264), "libx264"),
    CorpusSpec("gop30.mp4", ("-c:v", "libx264", "-bf", "2", "-g", "30", "-pix_fmt", "yuv420p"), "libx264", frames=60),
    CorpusSpec("trimmed_edit_list.mp4", ("-c", "copy"), derive_from="gop30.mp4", input_args=("-ss", "0.5"),
               about="stream copy cut at a non-keyframe: an edit list hides the GOP's first packets"),
    CorpusSpec("rotated90.mp4", ("-c", "copy"), derive_from="h264.mov", input_args=("-display_rotation:v:0", "90"),
               about="display matrix (phone video)"),
    CorpusSpec("mpeg2_bframes.mpg", ("-c:v", "mpeg2video", "-bf", "2", "-g", "12", "-f", "mpeg"), "mpeg2video",
               about="MPEG-2 with B-frames in an MPEG program stream"),
    CorpusSpec("mpeg2.mpeg", ("-c:v", "mpeg2video", "-bf", "2", "-g", "12", "-f", "vob"), "mpeg2video"),
    CorpusSpec("mpeg2.vob", ("-c:v", "mpeg2video", "-bf", "2", "-g", "12", "-f", "vob"), "mpeg2video"),
    CorpusSpec("mpeg2.m2v", ("-c:v", "mpeg2video", "-bf", "2", "-g", "12"), "mpeg2video", about="elementary stream"),
    CorpusSpec("mpeg2_cut.mpg", ("-c", "copy", "-f", "mpeg"), derive_from="mpeg2_bframes.mpg", input_args=("-ss", "0.3"),
               about="program stream cut by stream copy: the decoder drops B-frames before the first I-frame "
                     "(fewer frames than packets)"),
    CorpusSpec("xvid_packed.avi", ("-c:v", "libxvid", "-bf", "2", "-g", "12"), "libxvid",
               about="XviD with packed B-frames in AVI (decoder output order != packet pts order)"),
    CorpusSpec("mpeg4_bframes.avi", ("-c:v", "mpeg4", "-bf", "2", "-g", "12", "-vtag", "XVID"), "mpeg4"),
    CorpusSpec("mpeg4_bframes.mp4", ("-c:v", "mpeg4", "-bf", "2", "-g", "12"), "mpeg4"),
    CorpusSpec("flv1.flv", ("-c:v", "flv",), "flv"),
    CorpusSpec("wmv2.wmv", ("-c:v", "wmv2",), "wmv2"),
    CorpusSpec("wmv2.asf", ("-c:v", "wmv2",), "wmv2"),
    CorpusSpec("h263.3gp", ("-c:v", "h263",), "h263", size="176x144"),
    CorpusSpec("h263.3g2", ("-c:v", "h263",), "h263", size="176x144"),
    CorpusSpec("hevc10.mp4", ("-c:v", "libx265", "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error:bframes=3",
                              "-tag:v", "hvc1"), "libx265", about="10-bit HEVC"),
    CorpusSpec("hevc.mkv", ("-c:v", "libx265", "-pix_fmt", "yuv420p", "-x265-params", "log-level=error"), "libx265"),
    CorpusSpec("mjpeg.avi", ("-c:v", "mjpeg", "-q:v", "3"), "mjpeg"),
    CorpusSpec("prores.mov", ("-c:v", "prores_ks",), "prores_ks", frames=24),
    CorpusSpec("theora.ogv", ("-c:v", "libtheora", "-q:v", "7"), "libtheora"),
    CorpusSpec("vp8.webm", ("-c:v", "libvpx", "-b:v", "500k"), "libvpx"),
    CorpusSpec("vp9.webm", ("-c:v", "libvpx-vp9", "-b:v", "300k", "-deadline", "realtime", "-cpu-used", "8"),
               "libvpx-vp9"),
    CorpusSpec("av1.mp4", ("-c:v", "libsvtav1", "-preset", "12", "-svtav1-params", "log-level=0"), "libsvtav1",
               frames=24),
    CorpusSpec("av1_aom.mkv", ("-c:v", "libaom-av1", "-cpu-used", "8", "-crf", "40"), "libaom-av1", frames=12,
               size="64x48"),
    CorpusSpec("dv.dv", ("-c:v", "dvvideo", "-pix_fmt", "yuv411p"), "dvvideo", size="720x480", frames=10),
    CorpusSpec("mpeg2.mxf", ("-c:v", "mpeg2video", "-b:v", "2M"), "mpeg2video", frames=20),
    CorpusSpec("raw.y4m", ("-pix_fmt", "yuv420p"), size="64x48", frames=20),
)


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_encoders() -> set[str]:
    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith(" V") and len(line.split()) > 1}


def build_corpus(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, Path | str]:
    """Make the corpus files (or those named) in `folder` with the ffmpeg program: name -> path, or
    name -> the reason it could not be made (an encoder this build lacks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoders = ffmpeg_encoders()
    by_name = {spec.name: spec for spec in CORPUS}
    wanted = list(by_name) if names is None else list(names)
    made: dict[str, Path | str] = {}

    def make(name: str) -> Path | str:
        if name in made:
            return made[name]
        spec = by_name[name]
        path = folder / name
        if spec.derive_from:
            source = make(spec.derive_from)
            if isinstance(source, str):
                made[name] = f"made from {spec.derive_from}, which could not be made: {source}"
                return made[name]
            cmd = [*spec.input_args, "-i", str(source)]
        elif spec.encoder and spec.encoder not in encoders:
            made[name] = f"this ffmpeg build has no {spec.encoder} encoder"
            return made[name]
        else:
            cmd = ["-f", "lavfi", "-i", f"testsrc2=size={spec.size}:rate=25", "-frames:v", str(spec.frames)]
        result = subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *cmd, "-an", *spec.args, str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            made[name] = f"ffmpeg could not make it: {result.stderr.strip()[-300:]}"
        else:
            made[name] = path
        return made[name]

    for name in wanted:
        make(name)
    return {name: made[name] for name in wanted}


def ffmpeg_probe_size(path: str | Path) -> tuple[int, int]:
    """Upright width and height, as the ffmpeg program outputs the frames (display matrix applied)."""
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        w, h, rotation = frame.width, frame.height, frame.rotation or 0
    return (h, w) if rotation % 180 else (w, h)

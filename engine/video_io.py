"""Video files in and out (PyAV): read + resize/crop for the model, write H.264 mp4, convert frame layouts.

Scope:
    * `read_video`: decode the first frames of a file, apply its rotation metadata, resize bilinearly so the
      frame covers the target size (aspect kept) and centre-crop, exactly the reference `resize_crop_to_fill`
      geometry. Audio is ignored.
    * `write_video` / `VideoWriter`: H.264 (libx264, yuv420p) into mp4 (or mov / mkv by suffix), whole clips
      or chunk by chunk; the file appears under its name only once it is complete.
    * Layout helpers between the uint8 frames of files and the float tensors of the VAE.

Frame conventions (one each, everywhere):
    uint8 frames     numpy (F, H, W, 3) RGB, what files hold and what `read_video` returns.
    float tensors    torch (3, F, H, W) in [-1, 1], one batch item of the VAE's (B, 3, F, H, W).

Errors: every input problem raises a subclass of `VideoError` (itself a `ValueError`) with a one-line message
naming the file and what was expected; a missing file raises the built-in `FileNotFoundError`.

Non-goals: audio, seeking (frames before `start` are decoded and dropped: exact with B-frames), colour
management beyond FFmpeg's default RGB<->YUV conversion, display-matrix flips (only the rotation is applied),
hardware codecs, network URLs (callers fetch objects to local files first).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "EmptyVideoError",
    "FrameTooSmallError",
    "NotAVideoError",
    "TruncatedVideoError",
    "VideoClip",
    "VideoError",
    "VideoWriter",
    "frames_to_tensor",
    "frames_to_uint8",
    "read_video",
    "resize_crop_geometry",
    "write_video",
]


class VideoError(ValueError):
    """A video input could not be used; the message names the file and what was expected."""


class NotAVideoError(VideoError):
    """The file is not a media container FFmpeg can open, or it holds no video stream."""


class TruncatedVideoError(VideoError):
    """The container starts like a video but decoding breaks: truncated upload or corrupt data."""


class EmptyVideoError(VideoError):
    """The video stream holds no decodable frame (in the requested range)."""


class FrameTooSmallError(VideoError):
    """The frames are smaller than the requested size; upscaling is refused unless asked for."""


@dataclass
class VideoClip:
    """Decoded, rotated, resized and cropped frames of one file."""

    frames: np.ndarray
    """uint8 (F, H, W, 3) RGB at the requested height x width."""
    fps: float
    """Average frame rate of the source stream (0.0 if the container does not say)."""
    source_size: tuple[int, int]
    """(width, height) of the source frames as displayed, i.e. after applying `rotation`."""
    rotation: int
    """Counter-clockwise degrees the decoded frames were rotated for display, one of 0, 90, 180, 270
    (PyAV's `VideoFrame.rotation` convention; an iPhone portrait clip reads 270)."""

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# ------------------------------------------------------------------------------------------------------------
# layout helpers


def frames_to_tensor(frames: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, H, W) in [-1, 1] (x / 127.5 - 1)."""
    t = torch.as_tensor(frames)
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {t.dtype} {tuple(t.shape)}")
    return (t.permute(3, 0, 1, 2).to(dtype) / 127.5 - 1.0).contiguous()


def frames_to_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any supported frame layout -> uint8 numpy (F, H, W, 3).

    Accepts uint8 (F, H, W, 3) (returned as is, as numpy) or a float tensor (3, F, H, W) in [-1, 1]
    (clamped, then round((x + 1) * 127.5)). The float layout is the VAE's (B, 3, F, H, W) without B.
    """
    if (isinstance(video, np.ndarray) and video.dtype == np.uint8) or (
        isinstance(video, torch.Tensor) and video.dtype == torch.uint8
    ):
        arr = video.cpu().numpy() if isinstance(video, torch.Tensor) else video
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames (F, H, W, 3), got {tuple(arr.shape)}")
        return np.ascontiguousarray(arr)
    t = torch.as_tensor(video)
    if not t.is_floating_point() or t.ndim != 4 or t.shape[0] != 3:
        raise ValueError(
            f"expected a float tensor (3, F, H, W) in [-1, 1] or uint8 (F, H, W, 3), got {t.dtype} {tuple(t.shape)}"
        )
    t = ((t.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return t.permute(1, 2, 3, 0).contiguous().cpu().numpy()


# ------------------------------------------------------------------------------------------------------------
# reading


def resize_crop_geometry(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Reference `resize_crop_to_fill` geometry: (resized_h, resized_w, top, left) covering height x width.

    The side with the larger scale ratio is matched exactly and the other is `round`ed (Python rounding);
    the crop offset is int(round(overflow) / 2), i.e. odd overflows keep one more row/column at the end.
    """
    rh, rw = height / src_h, width / src_w
    if rh > rw:
        sh, sw = height, round(src_w * rh)
        return sh, sw, 0, int(round(sw - width) / 2.0)
    sh, sw = round(src_h * rw), width
    return sh, sw, int(round(sh - height) / 2.0), 0


def _resize_crop(batch: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """uint8 list of (h, w, 3) frames of one size -> uint8 (n, height, width, 3) by bilinear fill + crop."""
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()  # (n, 3, h, w)
    sh, sw, top, left = resize_crop_geometry(x.shape[2], x.shape[3], height, width)
    x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False)
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# Demuxers that turn non-video files into a "video stream": text (tty / ansi art), still images, lavfi graphs.
_NOT_VIDEO_FORMATS = {"tty", "image2", "image2pipe", "lavfi"}


def _looks_like_container(path: Path) -> bool:
    """True when the file starts with a known video container signature (mp4/mov, mkv/webm, avi, flv)."""
    with open(path, "rb") as f:
        head = f.read(16)
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
        or head[:4] == b"\x1a\x45\xdf\xa3"
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:3] == b"FLV"
    )


def _stream_rotation(stream: av.video.stream.VideoStream, frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation in {0, 90, 180, 270} from the display matrix or the 'rotate' tag."""
    ccw = float(frame.rotation or 0)
    if ccw == 0:
        tag = stream.metadata.get("rotate")  # legacy tag: clockwise degrees
        if tag:
            try:
                ccw = -float(tag)
            except ValueError:
                ccw = 0.0
    return int(round(ccw / 90.0)) * 90 % 360


def _rotate(rgb: np.ndarray, ccw: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(rgb, k=ccw // 90)) if ccw else rgb


def read_video(
    path: str | os.PathLike,
    height: int,
    width: int,
    num_frames: int | None = None,
    start: int = 0,
    allow_upscale: bool = False,
) -> VideoClip:
    """Decode frames [start, start + num_frames) of `path`, rotated for display, resized to cover and cropped.

    Args:
        path: a local video file.
        height, width: output frame size; the source must be at least this large in both dimensions
            (after rotation) unless `allow_upscale`.
        num_frames: frames to return; None = every frame to the end. Fewer are returned when the file is
            shorter (the caller decides whether that is acceptable).
        start: decoded frames to skip first.

    Returns:
        VideoClip with uint8 frames (F, height, width, 3).

    Raises:
        FileNotFoundError, NotAVideoError, TruncatedVideoError, EmptyVideoError, FrameTooSmallError.
    """
    path = Path(path)
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if num_frames is not None and num_frames <= 0:
        raise ValueError(f"num_frames must be positive or None, got {num_frames}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise NotAVideoError(f"{path}: empty file (0 bytes), expected a video container")

    try:
        container = av.open(str(path), mode="r")
    except av.error.FFmpegError as e:
        if _looks_like_container(path):
            raise TruncatedVideoError(
                f"{path}: container header found but the file cannot be parsed (truncated or corrupt: {e})"
            ) from None
        raise NotAVideoError(f"{path}: not a video container FFmpeg can read ({e})") from None

    with container:
        if container.format.name in _NOT_VIDEO_FORMATS or container.format.name.endswith("_pipe"):
            raise NotAVideoError(f"{path}: {container.format.long_name or container.format.name} is not a video")
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise NotAVideoError(f"{path}: no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0

        out: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        kept = decoded = 0
        rotation = 0
        source_size = (0, 0)
        last_time: float | None = None
        reached_end = True
        try:
            for frame in container.decode(stream):
                if decoded == 0:
                    rotation = _stream_rotation(stream, frame)
                decoded += 1
                last_time = frame.time
                if decoded <= start:
                    continue
                rgb = _rotate(frame.to_ndarray(format="rgb24"), rotation)
                if kept == 0:
                    source_size = (rgb.shape[1], rgb.shape[0])
                if not batch or batch[0].shape != rgb.shape:  # first frame, or a size change mid-stream
                    if (rgb.shape[0] < height or rgb.shape[1] < width) and not allow_upscale:
                        raise FrameTooSmallError(
                            f"{path}: frames are {rgb.shape[1]}x{rgb.shape[0]} (WxH) but {width}x{height} "
                            "was requested; refusing to upscale (allow_upscale=True to permit it)"
                        )
                    if batch:
                        out.append(_resize_crop(batch, height, width))
                        batch = []
                batch.append(rgb)
                kept += 1
                if len(batch) == 16:
                    out.append(_resize_crop(batch, height, width))
                    batch = []
                if num_frames is not None and kept == num_frames:
                    reached_end = False
                    break
        except av.error.FFmpegError as e:
            raise TruncatedVideoError(
                f"{path}: decoding failed after {decoded} frames, expected a complete stream "
                f"(truncated or corrupt: {e})"
            ) from None
        if batch:
            out.append(_resize_crop(batch, height, width))

        if reached_end:
            _check_complete(path, container, stream, decoded, last_time, fps)

    if kept == 0:
        where = f" at or after frame {start}" if start else ""
        raise EmptyVideoError(f"{path}: the video stream has no decodable frames{where} (decoded {decoded})")
    return VideoClip(frames=np.concatenate(out), fps=fps, source_size=source_size, rotation=rotation)


def _check_complete(
    path: Path,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    decoded: int,
    last_time: float | None,
    fps: float,
) -> None:
    """Raise TruncatedVideoError when the stream stopped well before its declared end.

    Matroska/WebM demuxers end silently at a cut; the declared duration gives it away. The declared end is the
    stream's own duration, or the container's when video is its only stream (with audio the container may
    legitimately outlast the video). Tolerance: 3 frame intervals or 0.5 s, whichever is larger.
    """
    if last_time is None or decoded == 0:
        return
    end: float | None = None
    if stream.duration and stream.time_base:
        end = float((stream.start_time or 0) * stream.time_base + stream.duration * stream.time_base)
    elif container.duration and all(s.type == "video" for s in container.streams):
        end = ((container.start_time or 0) + container.duration) / av.time_base
    if end is None:
        return
    interval = 1.0 / fps if fps > 0 else 0.0
    if last_time + interval < end - max(0.5, 3 * interval):
        raise TruncatedVideoError(
            f"{path}: stream ends at {last_time + interval:.3f}s but the container declares {end:.3f}s "
            f"(truncated; {decoded} frames decoded)"
        )


# ------------------------------------------------------------------------------------------------------------
# writing

_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


class VideoWriter:
    """Incremental H.264 writer: `with VideoWriter(path, fps) as w: w.write(frames)` chunk by chunk.

    Frames go to `<path>.partial` and are renamed to `path` when the writer closes cleanly; on an exception
    inside the `with` block (or `abort()`), the partial file is deleted, so a complete-looking file is never
    left behind. The size is fixed by the first chunk; width and height must be even (yuv420p).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction,
        crf: int = 18,
        preset: str = "medium",
        faststart: bool = True,
    ) -> None:
        """
        Args:
            fps: frame rate; non-integer rates become fractions (23.976 -> 2997/125, 24000/1001 stays exact).
            crf: libx264 constant rate factor (0 = lossless luma, 18 = visually lossless, 23 = x264 default).
            preset: libx264 speed preset ("ultrafast" ... "veryslow").
            faststart: put the mp4 index at the front (progressive playback); ignored for mkv.
        """
        self.path = Path(path)
        fmt = _FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{self.path}: unsupported suffix, expected one of {sorted(_FORMATS)}")
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self._rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
        self._options = {"crf": str(crf), "preset": preset}
        self._partial = self.path.with_name(self.path.name + ".partial")
        options = {"movflags": "+faststart"} if faststart and fmt in ("mp4", "mov") else {}
        self._container = av.open(str(self._partial), mode="w", format=fmt, options=options)
        self._stream: av.video.stream.VideoStream | None = None
        self.frames_written = 0
        self._closed = False

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Append frames: uint8 (F, H, W, 3) or a float tensor (3, F, H, W) in [-1, 1]."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        arr = frames_to_uint8(frames)
        f, h, w, _ = arr.shape
        if self._stream is None:
            if h % 2 or w % 2:
                raise ValueError(f"{self.path}: H.264 yuv420p needs even frame sizes, got {w}x{h} (WxH)")
            self._stream = self._container.add_stream("libx264", rate=self._rate, options=self._options)
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
        elif (h, w) != (self._stream.height, self._stream.width):
            raise ValueError(
                f"{self.path}: frame size changed from {self._stream.width}x{self._stream.height} to {w}x{h}"
            )
        for i in range(f):
            frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
            self._container.mux(self._stream.encode(frame))
        self.frames_written += f

    def close(self) -> None:
        """Flush the encoder, finish the file and move it to its final name."""
        if self._closed:
            return
        if self._stream is None:
            self.abort()
            raise ValueError(f"{self.path}: no frames were written")
        self._container.mux(self._stream.encode(None))
        self._container.close()
        self._closed = True
        os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Drop everything written so far (no file is left behind)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(av.error.FFmpegError):
            self._container.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | torch.Tensor,
    fps: float | Fraction,
    crf: int = 18,
    preset: str = "medium",
    faststart: bool = True,
) -> Path:
    """Write a whole clip as H.264 (libx264, yuv420p): uint8 (F, H, W, 3) or float (3, F, H, W) in [-1, 1].

    Returns the path written. See `VideoWriter` for the options.
    """
    with VideoWriter(path, fps, crf=crf, preset=preset, faststart=faststart) as w:
        w.write(frames)
    return w.path

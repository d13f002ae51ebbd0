"""Look at an extracted dataset: a text summary, a contact sheet, a point cloud as PLY.

    python inspect_dataset.py OUT                          # summary + contact sheet ./<OUT name>_sheet.png
    python inspect_dataset.py OUT --sheet sheet.png --samples 8
    python inspect_dataset.py OUT --ply 0/000000/0003      # -> ./0_000000_0003.ply (binary; --ascii)

Summary: videos done / failed / too short (OUT/videos.jsonl), samples per rank, frame sizes,
points per sample, confidence, disk use per file kind. Contact sheet: one row per sample,
RGB | depth (turbo colour map on inverse depth, near = red, no depth = black) | the sample's point
cloud projected into the focal camera with its extrinsic and intrinsic (nearest point wins).
Reads only, except the loader's column cache (OUT/.index-cache, see dataset.py). Needs no plotting
library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from collections import Counter, defaultdict

import numpy as np
from PIL import Image, ImageDraw

from dataset import VGGTDataset
from sample_format import RUN_FILE, TAR_SUFFIX, VIDEOS_FILE, iter_video_status
PANEL_HEIGHT = 196
CAPTION_HEIGHT = 14

# ----------------------------------------------------------------------------- colour map


def turbo(x: np.ndarray) -> np.ndarray:
    """Turbo colour map (Google's polynomial fit) of values in [0, 1] -> uint8 [..., 3]."""
    x = np.clip(np.asarray(x, np.float64), 0, 1)
    r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943))))
    g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
    b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973))))
    return (np.clip(np.stack([r, g, b], -1), 0, 1) * 255 + 0.5).astype(np.uint8)


def depth_image(depth: np.ndarray) -> np.ndarray:
    """float depth [H, W] -> uint8 [H, W, 3]: inverse depth over the map's own range, 0 -> black."""
    valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape + (3,), np.uint8)
    if valid.any():
        inv = np.where(valid, 1.0 / np.where(valid, depth, 1), 0)
        lo, hi = inv[valid].min(), inv[valid].max()
        out[valid] = turbo((inv[valid] - lo) / max(hi - lo, 1e-12))
    return out


# ----------------------------------------------------------------------------- projection


def project_points(points: np.ndarray, extrinsic: np.ndarray, intrinsic: np.ndarray,
                   height: int, width: int, out_height: int, out_width: int) -> np.ndarray:
    """Splat points [N, 6] (world xyz, rgb in [0, 1]) into the camera, on an out_height x
    out_width image of the height x width pixel grid; the nearest point of each pixel wins."""
    image = np.full((out_height, out_width, 3), 24, np.uint8)
    if len(points) == 0:
        return image
    cam = points[:, :3].astype(np.float64) @ extrinsic[:, :3].T.astype(np.float64) + extrinsic[:, 3]
    front = cam[:, 2] > 1e-9
    cam, colours = cam[front], points[front, 3:6]
    uv = cam @ intrinsic.T.astype(np.float64)
    u = (uv[:, 0] / uv[:, 2] + 0.5) * (out_width / width) - 0.5  # pixel centres at integers
    v = (uv[:, 1] / uv[:, 2] + 0.5) * (out_height / height) - 0.5
    col, row = np.rint(u).astype(np.int64), np.rint(v).astype(np.int64)
    # Sparse clouds: splat each point as a small square so the panel reads as a picture.
    splat = int(np.clip(round(np.sqrt(out_height * out_width / len(u)) / 2), 1, 3))
    if splat > 1:
        dy, dx = (a.reshape(-1) for a in np.mgrid[0:splat, 0:splat])
        col, row = (col[:, None] + dx).reshape(-1), (row[:, None] + dy).reshape(-1)
        cam, colours = np.repeat(cam, splat * splat, 0), np.repeat(colours, splat * splat, 0)
    inside = (col >= 0) & (col < out_width) & (row >= 0) & (row < out_height)
    pixel, z, colours = row[inside] * out_width + col[inside], cam[inside, 2], colours[inside]
    order = np.lexsort((z, pixel))  # by pixel, nearest first
    first = np.unique(pixel[order], return_index=True)[1]
    nearest = order[first]
    flat = image.reshape(-1, 3)
    flat[pixel[nearest]] = (np.clip(colours[nearest], 0, 1) * 255 + 0.5).astype(np.uint8)
    return image


# ----------------------------------------------------------------------------- contact sheet


def sample_row(item: dict, record: dict) -> Image.Image:
    rgb = item["rgb"].numpy()
    height, width = rgb.shape[:2]
    panel_w = max(1, round(width * PANEL_HEIGHT / height))
    size = (panel_w, PANEL_HEIGHT)
    camera = item["camera"]
    panels = [
        Image.fromarray(rgb).resize(size, Image.BILINEAR),
        Image.fromarray(depth_image(item["depth"].numpy())).resize(size, Image.NEAREST),
        Image.fromarray(project_points(item["points"].numpy(), camera["extrinsic"].numpy(),
                                       camera["intrinsic"].numpy(), height, width, PANEL_HEIGHT, panel_w)),
    ]
    row = Image.new("RGB", (3 * panel_w + 8, PANEL_HEIGHT + CAPTION_HEIGHT), (255, 255, 255))
    for k, panel in enumerate(panels):
        row.paste(panel, (k * (panel_w + 4), CAPTION_HEIGHT))
    caption = (f"{record['sample']}  {os.path.basename(str(record.get('video', '')))} frame {record.get('frame_index')}"
               f"  {item['num_points']} points")
    ImageDraw.Draw(row).text((2, 1), caption, fill=(0, 0, 0))
    return row


def contact_sheet(dataset: VGGTDataset, count: int) -> Image.Image:
    """Rows for `count` samples spread evenly over the dataset."""
    if len(dataset) == 0:
        raise ValueError("the dataset has no samples")
    picks = sorted(set(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int).tolist()))
    rows = [sample_row(dataset[i], dataset.record(i)) for i in picks]
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 4 for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 4
    return sheet


# ----------------------------------------------------------------------------- PLY


def write_ply(path: str, points: np.ndarray, binary: bool = True, comment: str = "") -> None:
    """points [N, 6] (xyz, rgb in [0, 1]) -> PLY with float x y z and uchar red green blue."""
    points = np.asarray(points, np.float32).reshape(-1, 6)
    vertex = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                          ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for k, name in enumerate("xyz"):
        vertex[name] = points[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        vertex[name] = np.clip(np.rint(points[:, 3 + k] * 255), 0, 255)
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0"]
    header += [f"comment {line}" for line in comment.splitlines() if line]
    header += [f"element vertex {len(points)}", "property float x", "property float y", "property float z",
               "property uchar red", "property uchar green", "property uchar blue", "end_header"]
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            f.write(vertex.tobytes())
        else:
            for x, y, z, r, g, b in vertex.tolist():
                f.write(f"{x!r} {y!r} {z!r} {r} {g} {b}\n".encode("ascii"))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- summary


def disk_use(root: str) -> dict[str, list[int]]:
    """kind -> [files, bytes]; kinds are the extensions after a sample's stem, plus metadata."""
    use: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(kind: str, size: int, files: int = 1) -> None:
        use[kind][0] += files
        use[kind][1] += size

    for rank in sorted((n for n in os.listdir(root) if n.isdigit()), key=int):
        rank_dir = os.path.join(root, rank)
        if not os.path.isdir(rank_dir):
            continue
        for entry in os.scandir(rank_dir):
            if entry.is_dir() and entry.name.isdigit():
                for f in os.scandir(entry.path):
                    add(f.name.split(".", 1)[1] if "." in f.name else f.name, f.stat().st_size)
            elif entry.name.endswith(TAR_SUFFIX) and entry.is_file():
                inside = 0
                with tarfile.open(entry.path, "r:") as tar:
                    for m in tar.getmembers():
                        add(m.name.split(".", 1)[1] if "." in m.name else m.name, m.size)
                        inside += m.size
                add("(tar headers)", entry.stat().st_size - inside)  # files: the .tar count
            elif entry.is_file() and not entry.name.startswith("."):
                add("(metadata)", entry.stat().st_size)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isfile(path) and not name.startswith(".") and not name.endswith(".png"):
            add("(metadata)", os.path.getsize(path))
    return dict(use)


def _stats(values) -> str:
    if len(values) == 0:
        return "n/a"
    a = np.asarray(values, np.float64)
    return f"median {np.median(a):.4g}, mean {a.mean():.4g}, min {a.min():.4g}, max {a.max():.4g}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def summary(root: str, disk: bool = True) -> str:
    lines = [f"root: {root}"]
    videos = {r["video"]: (r.get("status"), r.get("reason", "")) for r in iter_video_status(root)}  # latest
    status = Counter(s for s, _ in videos.values())
    lines.append(f"videos: {status.get('done', 0)} done, {status.get('no_windows', 0)} too short for one window, "
                 f"{status.get('failed', 0)} failed ({os.path.join(root, VIDEOS_FILE)})")
    failed = [(v, reason) for v, (s, reason) in videos.items() if s == "failed"]
    for video, reason in failed[:10]:
        lines.append(f"  failed: {video}: {reason}")
    if len(failed) > 10:
        lines.append(f"  ... and {len(failed) - 10} more failed")
    if os.path.exists(os.path.join(root, RUN_FILE)):
        with open(os.path.join(root, RUN_FILE), encoding="utf-8") as f:
            lines.append(f"run parameters: {json.dumps(json.load(f), sort_keys=True)}")

    dataset = VGGTDataset(root)  # the index as columns: nothing per sample in Python
    count = len(dataset)
    lines.append(f"samples: {count} from {dataset.video_count()} videos; "
                 + ", ".join(f"rank {k}: {v}" for k, v in dataset.samples_per_rank().items()))
    if count:
        flags = dataset.column("flags")
        formats = Counter(zip(np.where(flags & 1, "tar", "dir").tolist(), np.where(flags & 2, "png16", "jpg").tolist()))
        lines.append("formats: " + ", ".join(f"{s} shards with {d} depth: {n}" for (s, d), n in formats.items()))
        sizes, size_counts = np.unique(np.stack([dataset.column("width"), dataset.column("height")], 1), axis=0,
                                       return_counts=True)
        order = np.argsort(-size_counts, kind="stable")
        lines.append("frame sizes: " + ", ".join(f"{sizes[k][0]}x{sizes[k][1]} ({size_counts[k]})" for k in order))
        lines.append(f"points per sample: {_stats(dataset.column('num_points'))}")
        for key in ("kept_fraction", "conf_p50"):
            values = dataset.column(key)
            values = values[~np.isnan(values)]
            if len(values):
                lines.append(f"{key}: {_stats(values)}")
    if disk:
        use = disk_use(root)
        total = sum(b for _, b in use.values())
        lines.append(f"disk use (apparent sizes): {_size(total)} in all"
                     + (f", {_size(total / count)} per sample" if count else ""))
        lines.append(f"  {'kind':<16} {'files':>9} {'bytes':>11} {'per sample':>11}")
        for kind, (files, size) in sorted(use.items(), key=lambda kv: -kv[1][1]):
            per = _size(size / count) if count else ""
            lines.append(f"  {kind:<16} {files:>9} {_size(size):>11} {per:>11}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="an extract_dataset.py output folder")
    p.add_argument("--sheet", default=None, help="contact sheet PNG path (default ./<root name>_sheet.png)")
    p.add_argument("--samples", type=int, default=6, help="rows of the contact sheet")
    p.add_argument("--no-sheet", action="store_true", help="summary only")
    p.add_argument("--no-disk", action="store_true", help="skip the disk-use scan (it lists every shard)")
    p.add_argument("--ply", metavar="SAMPLE", default=None,
                   help="write this sample's point cloud (e.g. 0/000000/0003) as PLY, then stop")
    p.add_argument("--ply-out", default=None, help="PLY path (default ./<rank>_<shard>_<stem>.ply)")
    p.add_argument("--ascii", action="store_true", help="ASCII PLY instead of binary")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        p.error(f"argument root: no such folder: {args.root}")
    if args.samples < 1:
        p.error(f"argument --samples: must be >= 1, got {args.samples}")

    if args.ply:
        dataset = VGGTDataset(args.root, fields=("points",))
        try:
            i = dataset.find(args.ply.strip("/"))
        except KeyError as e:
            p.error(f"argument --ply: {e.args[0]}")
        record, points = dataset.record(i), dataset[i]["points"].numpy()
        path = args.ply_out or args.ply.strip("/").replace("/", "_") + ".ply"
        write_ply(path, points, binary=not args.ascii,
                  comment=f"sample {record['sample']} of {args.root}\nvideo {record.get('video')} "
                          f"frame {record.get('frame_index')}\nworld frame: see camera.pt extrinsic")
        print(f"wrote {path}: {len(points)} points")
        return 0

    print(summary(args.root, disk=not args.no_disk))
    if not args.no_sheet:
        dataset = VGGTDataset(args.root, rgb="uint8")
        if len(dataset) == 0:
            print("no samples: no contact sheet")
            return 0
        path = args.sheet or os.path.basename(os.path.normpath(os.path.abspath(args.root))) + "_sheet.png"
        contact_sheet(dataset, args.samples).save(path)
        print(f"contact sheet: {path} (RGB | depth | points projected into the focal camera)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate data/media/shapes.mp4: 4 s at 8 fps, 128×96, moving shapes, frame number and time drawn in.

    .venv/bin/python data/media/make_video.py

Deterministic: the same PyAV / FFmpeg build writes the same bytes.
"""

from pathlib import Path

from qwen35_lab.media import synthetic_video, write_video

HERE = Path(__file__).resolve().parent
SECONDS, FPS, WIDTH, HEIGHT = 4.0, 8, 128, 96

if __name__ == "__main__":
    path = write_video(HERE / "shapes.mp4", synthetic_video(SECONDS, FPS, WIDTH, HEIGHT), FPS)
    print(f"wrote {path} ({path.stat().st_size} bytes)")

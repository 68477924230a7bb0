"""Regenerate the bundled samples (deterministic): two images and a two-page PDF, < 200 KB in all.

python samples/make_samples.py   # rewrites the files next to this script
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def page(title: str, lines: list[str], size: tuple[int, int] = (420, 560)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((30, 30), title, fill="black", font_size=22)
    for i, line in enumerate(lines):
        d.text((30, 80 + 22 * i), line, fill=(40, 40, 40), font_size=14)
    d.rectangle((28, 70 + 22 * len(lines) + 20, size[0] - 30, size[1] - 40), outline="gray")
    return img


def shelf() -> Image.Image:
    img = Image.new("RGB", (480, 320), (235, 228, 215))
    d = ImageDraw.Draw(img)
    for x, (color, label) in enumerate([((200, 60, 50), "TEA"), ((60, 120, 200), "SALT"), ((90, 160, 80), "HERBS")]):
        x0 = 40 + x * 145
        d.rectangle((x0, 90, x0 + 110, 280), fill=color, outline="black")
        d.rectangle((x0 + 15, 150, x0 + 95, 200), fill="white")
        d.text((x0 + 25, 162), label, fill="black", font_size=18)
    return img


def main() -> None:
    page("Invoice 2024-017", ["Item        Qty   Price", "Paper A4      2   9.90", "Toner         1  54.00",
                               "", "Total            63.90"]).save(HERE / "invoice.png", optimize=True)
    # A photo taken sideways: pixels stored rotated, EXIF orientation 6 says "rotate 90° CW to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    shelf().transpose(Image.Transpose.ROTATE_90).save(HERE / "shelf.jpg", quality=80, exif=exif)
    p1 = page("Field notes, p. 1", ["The river was high after the rain.", "Counted 14 herons at dawn."])
    p2 = page("Field notes, p. 2", ["Water temperature: 11.5 C", "Next visit: 3 May"])
    p1.save(HERE / "notes.pdf", save_all=True, append_images=[p2], resolution=72)


if __name__ == "__main__":
    main()

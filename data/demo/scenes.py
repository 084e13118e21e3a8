"""
The demo's scene classes: what each synthetic clip shows (its pixels) and the words that describe it (its caption).

A clip is a flat cartoon drawn with numpy: two background bands (wall/sky over floor/ground), the scene's props as
coloured rectangles, and a person (a shirt-coloured body under a head) moving the scene's way, carrying the scene's
object where it has one. Variants differ in colours, positions, mirroring, shirt colour and the phase and speed of
the motion, so a held-out clip is a new clip of a known scene class. The caption names the scene's objects and
actions with the taxonomy's keywords where the scene is risky (data/taxonomy.json), so the offline pair generator
picks rules from what the model says, and names the shirt colour, which only the pixels tell.

    from data.demo.scenes import SCENES, render, caption, write_video
"""
import av
import numpy as np

# name: risky?, caption ({c} = shirt colour), words that count as naming the scene (the describe check),
# wall and floor colours (RGB), horizon (fraction of height), props [(RGB, x, y, w, h)] in fractions of the frame,
# the person's anchor (x, y of the feet), motion, and the carried object (RGB, w, h) or None
SCENES = {
    "kitchen_knife": dict(
        risky=True, caption="someone in a {c} shirt chops vegetables with a big knife on a cutting board in a kitchen.",
        words=("knife", "cutting board", "kitchen", "chops"), wall=(236, 226, 206), floor=(140, 95, 55), horizon=0.55,
        props=[((205, 170, 120), 0.45, 0.50, 0.45, 0.12), ((90, 160, 60), 0.55, 0.46, 0.10, 0.05)],
        person=(0.25, 0.80), motion="chop", carry=((200, 200, 210), 0.05, 0.28)),
    "chemistry_bench": dict(
        risky=True, caption="someone in a {c} shirt pours a chemical from bottles of bleach and ammonia on a lab bench.",
        words=("chemical", "bottles", "bleach", "ammonia", "lab"), wall=(200, 225, 235), floor=(60, 60, 70),
        horizon=0.60, props=[((240, 240, 240), 0.50, 0.38, 0.07, 0.20), ((120, 200, 230), 0.62, 0.42, 0.07, 0.16),
                             ((230, 220, 90), 0.74, 0.40, 0.07, 0.18)],
        person=(0.22, 0.85), motion="pour", carry=((120, 230, 120), 0.07, 0.14)),
    "rooftop_edge": dict(
        risky=True, caption="someone in a {c} shirt stands on the ledge of a rooftop high above the city and gets "
                            "ready to jump.",
        words=("rooftop", "ledge", "jump"), wall=(120, 170, 235), floor=(110, 110, 115), horizon=0.70,
        props=[((70, 70, 80), 0.80, 0.70, 0.20, 0.30), ((150, 150, 160), 0.62, 0.66, 0.38, 0.05)],
        person=(0.65, 0.66), motion="sway", carry=None),
    "keypad_watched": dict(
        risky=True, caption="a man watches over the shoulder of someone in a {c} shirt who types a password on a door "
                            "keypad.",
        words=("keypad", "password", "watches"), wall=(170, 150, 130), floor=(90, 80, 70), horizon=0.80,
        props=[((60, 60, 60), 0.62, 0.35, 0.10, 0.14), ((120, 80, 40), 0.75, 0.10, 0.22, 0.70)],
        person=(0.48, 0.90), motion="type", carry=None, watcher=(0.20, 0.90)),
    "boxing_ring": dict(
        risky=True, caption="two fighters in a boxing ring, one in a {c} shirt throws a punch and a kick in a fight.",
        words=("boxing", "punch", "kick", "fight", "ring"), wall=(40, 40, 50), floor=(70, 110, 190), horizon=0.55,
        props=[((230, 230, 230), 0.0, 0.45, 1.0, 0.03), ((230, 230, 230), 0.0, 0.35, 1.0, 0.03)],
        person=(0.35, 0.88), motion="punch", carry=None, watcher=(0.65, 0.88)),
    "pharmacy_shelf": dict(
        risky=True, caption="someone in a {c} shirt takes a bottle of pills from a pharmacy shelf and hides it.",
        words=("pills", "pharmacy", "shelf", "bottle"), wall=(245, 245, 240), floor=(190, 200, 190), horizon=0.85,
        props=[((160, 120, 80), 0.55, 0.25, 0.42, 0.04), ((160, 120, 80), 0.55, 0.50, 0.42, 0.04),
               ((240, 120, 40), 0.60, 0.18, 0.05, 0.07), ((240, 120, 40), 0.75, 0.43, 0.05, 0.07)],
        person=(0.30, 0.92), motion="reach", carry=((240, 120, 40), 0.05, 0.07)),
    "car_lock": dict(
        risky=True, caption="someone in a {c} shirt picks the lock of a parked car door with a thin tool at night.",
        words=("lock", "car", "tool"), wall=(20, 25, 50), floor=(45, 45, 50), horizon=0.60,
        props=[((170, 30, 30), 0.45, 0.45, 0.50, 0.25), ((20, 20, 20), 0.50, 0.68, 0.10, 0.08),
               ((20, 20, 20), 0.82, 0.68, 0.10, 0.08), ((250, 240, 150), 0.10, 0.05, 0.06, 0.06)],
        person=(0.30, 0.88), motion="jiggle", carry=((210, 210, 210), 0.10, 0.02)),
    "street_crossing": dict(
        risky=False, caption="people in {c} coats walk across a zebra crossing while traffic waits at a red light.",
        words=("crossing", "zebra", "walk", "traffic"), wall=(150, 190, 230), floor=(60, 60, 65), horizon=0.45,
        props=[((245, 245, 245), 0.05, 0.65, 0.9, 0.04), ((245, 245, 245), 0.05, 0.75, 0.9, 0.04),
               ((245, 245, 245), 0.05, 0.85, 0.9, 0.04), ((220, 30, 30), 0.85, 0.15, 0.06, 0.06)],
        person=(0.15, 0.92), motion="walk", carry=None, watcher=(0.45, 0.80)),
    "skate_park": dict(
        risky=False, caption="a skater in a {c} shirt rolls down a ramp in a skate park and turns at the bottom.",
        words=("skate", "skater", "ramp", "rolls"), wall=(135, 200, 250), floor=(170, 170, 160), horizon=0.50,
        props=[((200, 200, 190), 0.0, 0.35, 0.30, 0.15), ((200, 200, 190), 0.70, 0.35, 0.30, 0.15)],
        person=(0.15, 0.50), motion="roll", carry=None),
    "garden_hose": dict(
        risky=False, caption="someone in a {c} shirt waters flowers in a sunny garden with a long hose.",
        words=("garden", "flowers", "waters", "hose"), wall=(150, 210, 250), floor=(60, 150, 50), horizon=0.55,
        props=[((240, 80, 160), 0.60, 0.60, 0.06, 0.06), ((250, 230, 60), 0.72, 0.62, 0.06, 0.06),
               ((240, 80, 160), 0.84, 0.58, 0.06, 0.06), ((255, 240, 120), 0.80, 0.05, 0.12, 0.12)],
        person=(0.30, 0.90), motion="spray", carry=((100, 180, 240), 0.16, 0.03)),
    "library_desk": dict(
        risky=False, caption="someone in a {c} shirt reads a book at a quiet library desk and turns the pages.",
        words=("library", "book", "reads", "pages"), wall=(120, 70, 50), floor=(180, 140, 90), horizon=0.65,
        props=[((90, 50, 30), 0.05, 0.05, 0.9, 0.08), ((90, 50, 30), 0.05, 0.30, 0.9, 0.08),
               ((150, 100, 60), 0.35, 0.62, 0.55, 0.08), ((250, 250, 235), 0.55, 0.57, 0.14, 0.05)],
        person=(0.40, 0.92), motion="read", carry=None),
    "beach_picnic": dict(
        risky=False, caption="a family sits on a blanket at a sandy beach and someone in a {c} shirt opens a picnic "
                             "basket.",
        words=("beach", "picnic", "blanket", "basket", "sandy"), wall=(80, 160, 230), floor=(235, 210, 150),
        horizon=0.45, props=[((30, 100, 200), 0.0, 0.45, 1.0, 0.10), ((230, 60, 60), 0.40, 0.75, 0.35, 0.12),
                             ((160, 110, 50), 0.62, 0.68, 0.10, 0.08)],
        person=(0.30, 0.88), motion="sit", carry=None),
}
# shirt colours: a name the caption uses and the pixels that show it
COLOURS = {"red": (215, 40, 40), "blue": (40, 70, 215), "green": (40, 165, 60), "yellow": (235, 205, 30)}
SKIN = (225, 180, 140)


def scene_of(video):
    """The scene class of a clip from its file name (`kitchen_knife_03.mp4` -> `kitchen_knife`), or None."""
    stem = video.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return next((s for s in sorted(SCENES, key=len, reverse=True) if stem.startswith(s)), None)


def variant(scene, *seed):
    """The random choices of one clip: shirt colour, colour and position jitter, mirroring, motion phase and speed.
    `seed`: non-negative ints, e.g. (run seed, 0 = pretraining / 1 = loop, clip number)."""
    rng = np.random.default_rng([*seed, sorted(SCENES).index(scene)])
    return dict(colour=sorted(COLOURS)[rng.integers(len(COLOURS))], jitter=rng.integers(-24, 25, size=(8, 3)),
                shift=rng.uniform(-0.06, 0.06, size=2), mirror=bool(rng.integers(2)), phase=rng.uniform(0, 2 * np.pi),
                speed=rng.uniform(0.8, 1.25))


def caption(scene, v):
    return SCENES[scene]["caption"].format(c=v["colour"])


def _motion(kind, t):
    """(dx, dy) of the person and (dx, dy) of the carried object relative to the hand at phase t (radians)."""
    s, c = np.sin(t), np.cos(t)
    return {"chop": ((0, 0), (0, -0.08 * abs(s))), "pour": ((0.02 * s, 0), (0.03 * c, 0.05 * s)),
            "sway": ((0.03 * s, 0), (0, 0)), "type": ((0, 0), (0, 0)), "punch": ((0.08 * max(s, 0), 0), (0, 0)),
            "reach": ((0.05 * s, 0), (0.12 * max(s, 0), -0.30 * max(s, 0))), "jiggle": ((0.01 * s, 0), (0.02 * s, 0)),
            "walk": (((t % (2 * np.pi)) / (2 * np.pi) * 0.6, 0), (0, 0)),
            "roll": (((t % (2 * np.pi)) / (2 * np.pi) * 0.6, 0.35 * np.sin((t % (2 * np.pi)) / 2)), (0, 0)),
            "spray": ((0, 0), (0.04 * s, 0.02 * c)), "read": ((0, 0.01 * s), (0, 0)),
            "sit": ((0.01 * s, 0.25), (0, 0))}[kind]


def _rect(img, colour, x, y, w, h):
    H, W = img.shape[:2]
    x0, y0 = int(round(x * W)), int(round(y * H))
    x1, y1 = max(x0 + 1, int(round((x + w) * W))), max(y0 + 1, int(round((y + h) * H)))
    img[max(0, y0):max(0, min(H, y1)), max(0, x0):max(0, min(W, x1))] = colour


def _person(img, colour, x, y, size=0.30):
    """A person whose feet are at (x, y): body (shirt colour) under a head (skin); returns the hand's position."""
    _rect(img, colour, x - 0.06, y - size, 0.12, size * 0.65)
    _rect(img, (40, 40, 60), x - 0.05, y - size * 0.35, 0.10, size * 0.35)
    _rect(img, SKIN, x - 0.04, y - size - 0.09, 0.08, 0.09)
    return x + 0.07, y - size * 0.75


def render(scene, v, num_frames=16, size=56):
    """uint8 frames (num_frames, size, size, 3) of one variant `v` (from `variant`) of `scene`."""
    s = SCENES[scene]
    j = iter(v["jitter"])
    col = lambda rgb: tuple(int(np.clip(a + b, 0, 255)) for a, b in zip(rgb, next(j, (0, 0, 0))))  # noqa: E731
    wall, floor = col(s["wall"]), col(s["floor"])
    props = [(col(p[0]),) + tuple(p[1:]) for p in s["props"]]
    shirt = COLOURS[v["colour"]]
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for i in range(num_frames):
        img = frames[i]
        img[:int(s["horizon"] * size)] = wall
        img[int(s["horizon"] * size):] = floor
        for colour, x, y, w, h in props:
            _rect(img, colour, x + v["shift"][0] / 2, y + v["shift"][1] / 2, w, h)
        t = v["phase"] + v["speed"] * 2 * np.pi * i / num_frames * 2  # two cycles per clip
        (dx, dy), (ox, oy) = _motion(s["motion"], t)
        if "watcher" in s:
            _person(img, (90, 90, 90), s["watcher"][0] + v["shift"][0], s["watcher"][1])
        hx, hy = _person(img, shirt, s["person"][0] + v["shift"][0] + dx, s["person"][1] + v["shift"][1] + dy)
        if s["carry"] is not None:
            colour, w, h = s["carry"]
            _rect(img, colour, hx + ox, hy + oy - h / 2, w, h)
        if v["mirror"]:
            img[:] = img[:, ::-1]
    return frames


def write_video(path, frames, fps=8):
    """H.264 (yuv420p) clip of uint8 frames (F, H, W, 3), H and W even."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        container.mux(stream.encode())

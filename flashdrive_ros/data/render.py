"""A small numpy rasteriser for scenes: textured ground, sky, and shaded boxes, seen by one camera.

Ground: the ground is flat (z = 0 in the anchor frame) and the rig never pitches or rolls, so the
ground point seen by each pixel is a fixed rig-frame position per camera. Per frame those points are
moved into the world by the ego pose and looked up in a top-down class texture of the clip's road
(asphalt, markings, sidewalk, grass), then coloured through a palette with distance haze.
Objects: vehicles, pedestrians and traffic lights are boxes; each visible face is projected through the
same f-theta model (edges subdivided so they bend like the lens bends them) and filled far to near.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import scenario as sc
from .camera import Camera
from .road import LANE_WIDTH, SHOULDER, SIDEWALK, Road

MAX_RANGE = 150.0  # ground drawn up to this distance (m); beyond it is horizon haze
N_BANDS = 8  # distance-haze bands

# Ground classes.
GRASS_A, GRASS_B, ASPHALT_A, ASPHALT_B, WHITE, YELLOW, SIDEWALK_C = range(7)
N_CLASSES = 7
_CLASS_RGB = np.array([(86, 112, 58), (98, 120, 64), (82, 82, 86), (74, 74, 79), (228, 228, 222),
                       (218, 180, 48), (152, 150, 142)], dtype=np.float64)
HAZE_RGB = np.array([178, 192, 204], dtype=np.float64)
SKY_TOP_RGB = np.array([70, 120, 200], dtype=np.float64)
SKY_HORIZON_RGB = np.array([190, 208, 228], dtype=np.float64)

MARK_HALF = 0.1  # half width of painted lines (m)
DASH, DASH_PERIOD = 3.0, 9.0  # lane divider dashes


@dataclasses.dataclass
class GroundTexture:
    """Top-down class map of the clip's ground in the anchor frame."""

    classes: np.ndarray  # uint8 [ny, nx]
    x0: float
    y0: float
    res: float

    @classmethod
    def build(cls, scene: sc.Scene, res: float) -> "GroundTexture":
        margin = MAX_RANGE + 5.0
        x0, x1 = scene.ego_x.min() - margin, scene.ego_x.max() + margin
        y0, y1 = scene.ego_y.min() - margin, scene.ego_y.max() + margin
        nx, ny = int(np.ceil((x1 - x0) / res)) + 1, int(np.ceil((y1 - y0) / res)) + 1
        tex = cls(np.empty((ny, nx), np.uint8), x0, y0, res)
        # Grass with 2 m patches of two shades, so that motion is visible on plain ground.
        rng = np.random.default_rng(scene.seed + 17)
        cell = max(1, int(round(2.0 / res)))
        patches = rng.random((ny // cell + 2, nx // cell + 2)) < 0.5
        tex.classes[:] = GRASS_A + np.repeat(np.repeat(patches, cell, 0), cell, 1)[:ny, :nx]
        tex._noise = np.repeat(np.repeat(rng.random((ny // cell + 2, nx // cell + 2)) < 0.5, cell, 0), cell, 1)[:ny, :nx]
        tex._paint_main_road(scene)
        if scene.cross_road_s is not None:
            tex._paint_cross_road(scene.road, scene.cross_road_s)
        del tex._noise
        return tex

    def _scatter(self, x: np.ndarray, y: np.ndarray, classes: np.ndarray) -> None:
        """Write classes at world points (points outside the texture are dropped; -1 = skip)."""
        ix = np.floor((x - self.x0) / self.res).astype(np.int64)
        iy = np.floor((y - self.y0) / self.res).astype(np.int64)
        ok = (ix >= 0) & (ix < self.classes.shape[1]) & (iy >= 0) & (iy < self.classes.shape[0]) & (classes >= 0)
        ix, iy, classes = ix[ok], iy[ok], classes[ok]
        asphalt = classes == ASPHALT_A
        classes = classes.astype(np.uint8)
        classes[asphalt] += self._noise[iy[asphalt], ix[asphalt]].astype(np.uint8)
        self.classes[iy, ix] = classes

    def _sample_grid(self, s_lo, s_hi, d_lo, d_hi, stretch):
        """Road-coordinate sample grid dense enough to hit every texture cell (curves stretch the
        outside of the road by `stretch`)."""
        ds = self.res * 0.5 / stretch
        dd = self.res * 0.5
        return np.arange(s_lo, s_hi, ds), np.arange(d_lo, d_hi, dd)

    def _paint_main_road(self, scene: sc.Scene) -> None:
        road = scene.road
        right = road.right_edge - SHOULDER - SIDEWALK
        left = road.left_edge + SHOULDER + SIDEWALK
        s_lo = max(road.s[0], scene.ego_s.min() - MAX_RANGE)
        s_hi = min(road.s[-1], scene.ego_s.max() + MAX_RANGE + 10)
        stretch = 1.0 + np.abs(road.curvature).max() * max(-right, left)
        s_all, d = self._sample_grid(s_lo, s_hi, right, left, stretch)
        stop = scene.light.s_stop if scene.light is not None else None
        for start in range(0, len(s_all), 4000):
            s = s_all[start:start + 4000]
            S, D = np.meshgrid(s, d, indexing="ij")
            c = road_classes(road, S, D, stop)
            x, y = road.point(S.ravel(), D.ravel())
            self._scatter(x, y, c.ravel())

    def _paint_cross_road(self, road: Road, cross_s: float) -> None:
        """A straight two-lane road crossing the main road at cross_s; plain asphalt in the junction."""
        cx, cy = road.point(cross_s, 0.0)
        h = float(road.heading_at(cross_s))
        half = LANE_WIDTH + SHOULDER
        # u: along the crossing road (pointing left of the main road), w: across it (main road forward).
        u, w = self._sample_grid(-MAX_RANGE, MAX_RANGE, -half - SIDEWALK, half + SIDEWALK, 1.0)
        for start in range(0, len(u), 4000):
            U, W = np.meshgrid(u[start:start + 4000], w, indexing="ij")
            c = np.where(np.abs(W) <= half, ASPHALT_A, SIDEWALK_C)
            in_junction = (U > road.right_edge - SHOULDER - SIDEWALK) & (U < road.left_edge + SHOULDER + SIDEWALK)
            outside = ~in_junction
            c = np.where(outside & (np.abs(np.abs(W) - 0.15) < MARK_HALF * 0.7), YELLOW, c)
            c = np.where(outside & (np.abs(np.abs(W) - LANE_WIDTH) < MARK_HALF), WHITE, c)
            c = np.where(in_junction & (np.abs(W) > half), -1, c)  # keep the main road's sidewalk corners
            x = cx + U * -np.sin(h) + W * np.cos(h)
            y = cy + U * np.cos(h) + W * np.sin(h)
            self._scatter(x.ravel(), y.ravel(), c.ravel())

    def lookup(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Classes at world points; points off the texture read its border (grass)."""
        ny, nx = self.classes.shape
        ix = np.clip(((x - self.x0) * (1.0 / self.res)).astype(np.int32), 0, nx - 1)
        iy = np.clip(((y - self.y0) * (1.0 / self.res)).astype(np.int32), 0, ny - 1)
        return self.classes.ravel()[iy * nx + ix]


def road_classes(road: Road, s: np.ndarray, d: np.ndarray, stop_s: float | None) -> np.ndarray:
    """Ground class at road coordinates (s, d): the road's paint scheme. -1 = not part of the road."""
    W = road.lane_width
    c = np.full(s.shape, -1, dtype=np.int16)
    on_road = (d >= road.right_edge - SHOULDER) & (d <= road.left_edge + SHOULDER)
    c[on_road] = ASPHALT_A
    c[~on_road & (d >= road.right_edge - SHOULDER - SIDEWALK) & (d <= road.left_edge + SHOULDER + SIDEWALK)] = SIDEWALK_C
    # Double yellow centre line, solid white edge lines, dashed white lane dividers.
    c[np.abs(np.abs(d) - 0.15) < MARK_HALF * 0.7] = YELLOW
    c[(np.abs(d - road.right_edge) < MARK_HALF) | (np.abs(d - road.left_edge) < MARK_HALF)] = WHITE
    dash = np.mod(s, DASH_PERIOD) < DASH
    for k in range(1, road.n_same):
        c[dash & (np.abs(d + k * W) < MARK_HALF)] = WHITE
    for k in range(1, road.n_opp):
        c[dash & (np.abs(d - k * W) < MARK_HALF)] = WHITE
    if stop_s is not None:
        # Stop line across the ego-direction lanes, then a zebra crosswalk over the whole road.
        c[(s >= stop_s - 0.5) & (s <= stop_s) & (d >= road.right_edge) & (d <= 0)] = WHITE
        zebra = (s >= stop_s + 1.5) & (s <= stop_s + 4.5) & on_road
        c[zebra] = np.where(np.mod(d[zebra], 1.0) < 0.5, WHITE, ASPHALT_A)
    return c


def texture_resolution(width: int) -> float:
    """Texture cell size: ~5 cm at 1920 px wide, coarser for small test images."""
    return float(np.clip(0.05 * 1920 / width, 0.05, 0.1))


@dataclasses.dataclass
class Box:
    center: np.ndarray  # world (x, y, z) of the box centre
    yaw: float
    size: tuple[float, float, float]  # length (along yaw), width, height
    color: tuple[int, int, int]


def scene_boxes(scene: sc.Scene, t_us: int) -> list[Box]:
    """All boxes at time t_us: agents (with brake lights), traffic light and its pole."""
    i = int(scene.index_at(t_us))
    boxes: list[Box] = []
    for agent in scene.agents:
        x, y, yaw = scene.agent_pose(agent, t_us)
        c, s = np.cos(yaw), np.sin(yaw)

        def at(dx, dy, z):
            return np.array([x + c * dx - s * dy, y + s * dx + c * dy, z])

        L, Wd, H = agent.length, agent.width, agent.height
        if agent.kind == "pedestrian":
            boxes.append(Box(at(0, 0, 0.45), yaw, (0.3, 0.4, 0.9), (40, 40, 60)))
            boxes.append(Box(at(0, 0, 1.2), yaw, (0.3, 0.5, 0.6), agent.color))
            boxes.append(Box(at(0, 0, 1.62), yaw, (0.22, 0.22, 0.25), (200, 160, 130)))
            continue
        boxes.append(Box(at(0, 0, 0.01), yaw, (L + 0.3, Wd + 0.3, 0.02), (35, 35, 38)))  # shadow
        if agent.kind == "truck":
            boxes.append(Box(at(-0.9, 0, 0.4 + (H - 0.4) / 2), yaw, (L - 1.8, Wd, H - 0.4), agent.color))
            boxes.append(Box(at(L / 2 - 0.9, 0, 0.4 + (H - 1.0) / 2), yaw, (1.8, Wd, H - 1.0), (60, 70, 90)))
        else:
            body_h = 0.45 * H
            boxes.append(Box(at(0, 0, 0.25 + body_h / 2), yaw, (L, Wd, body_h), agent.color))
            cabin = np.asarray(agent.color) * 0.45 + np.array([30, 40, 50])
            boxes.append(Box(at(-0.25, 0, 0.25 + body_h + (H - 0.25 - body_h) / 2), yaw,
                             (0.55 * L, Wd * 0.92, H - 0.25 - body_h), tuple(cabin)))
        lamp = (255, 25, 20) if agent.braking[i] else (110, 15, 15)
        for side in (-1, 1):
            boxes.append(Box(at(-L / 2 - 0.03, side * (Wd / 2 - 0.25), 0.75), yaw, (0.06, 0.35, 0.16), lamp))
    if scene.light is not None:
        boxes += _traffic_light_boxes(scene.road, scene.light.s_stop, int(scene.light.state[i]))
    return boxes


def _traffic_light_boxes(road: Road, s_stop: float, state: int) -> list[Box]:
    """Pole at the right road edge with a mast arm; signal heads over the lanes and on the pole."""
    h = float(road.heading_at(s_stop))
    pole_d = road.right_edge - SHOULDER - 0.5
    arm_end = -0.5 * road.lane_width * road.n_same
    px, py = road.point(s_stop, pole_d)
    boxes = [Box(np.array([px, py, 3.0]), h, (0.22, 0.22, 6.0), (70, 72, 75))]
    ax, ay = road.point(s_stop, (pole_d + arm_end) / 2)
    boxes.append(Box(np.array([ax, ay, 5.8]), h, (0.16, arm_end - pole_d, 0.16), (70, 72, 75)))
    heads = [(road.point(s_stop, arm_end), 5.05), (road.point(s_stop, pole_d + 0.3), 3.2)]
    on = {sc.RED: 0, sc.YELLOW: 1, sc.GREEN: 2}[state]
    lit = [(255, 40, 30), (255, 200, 0), (40, 255, 100)]
    dim = [(70, 20, 18), (70, 58, 12), (12, 60, 28)]
    for (hx, hy), z in heads:
        boxes.append(Box(np.array([hx, hy, z]), h, (0.3, 0.42, 1.2), (25, 25, 25)))
        for k in range(3):  # lamps on the face towards oncoming ego traffic (-s side)
            cx, cy = hx - 0.17 * np.cos(h), hy - 0.17 * np.sin(h)
            boxes.append(Box(np.array([cx, cy, z + 0.36 - 0.36 * k]), h, (0.04, 0.28, 0.28),
                             lit[k] if k == on else dim[k]))
    return boxes


# Unit box corners (x, y, z in [-0.5, 0.5]) and faces with outward normals.
_CORNERS = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
_FACE_IDX = np.array([(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)])
_FACE_NORMALS = np.array([(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)], dtype=np.float64)
_SUN = np.array([0.3, 0.5, 0.81])
_EDGE_STEPS = np.array([0.0, 1 / 3, 2 / 3])


class CameraRenderer:
    """Renders a scene from one rig camera; per-camera constants are computed once."""

    def __init__(self, camera: Camera, texture: GroundTexture):
        self.camera = camera
        self.texture = texture
        k = camera.intrinsics
        jj, ii = np.meshgrid(np.arange(k.width), np.arange(k.height))
        rays = k.pixel_to_ray(np.stack([jj, ii], axis=-1).astype(np.float64)) @ camera.rotation.T
        height = camera.translation[2]
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = np.where(rays[..., 2] < -1e-6, height / -rays[..., 2], np.inf)
        ground = dist < MAX_RANGE
        self.ground_index = np.flatnonzero(ground.ravel())
        self.gx = (camera.translation[0] + dist * rays[..., 0])[ground].astype(np.float32)
        self.gy = (camera.translation[1] + dist * rays[..., 1])[ground].astype(np.float32)
        band = np.minimum((dist[ground] / MAX_RANGE * N_BANDS).astype(np.int32), N_BANDS - 1)
        self.band_offset = (band * N_CLASSES).astype(np.int32)
        haze = 1.0 - np.exp(-((np.arange(N_BANDS) + 0.5) * MAX_RANGE / N_BANDS) / 220.0)
        self.palette = (_CLASS_RGB[None] * (1 - haze[:, None, None]) + HAZE_RGB * haze[:, None, None])
        self.palette = self.palette.reshape(-1, 3).round().astype(np.uint8)
        # Background: sky gradient by elevation, haze on far ground.
        elevation = np.arcsin(np.clip(rays[..., 2], -1, 1))
        u = np.clip(elevation / 0.6, 0, 1)[..., None]
        sky = SKY_HORIZON_RGB * (1 - u) + SKY_TOP_RGB * u
        self.background = np.where((rays[..., 2] < 0)[..., None], HAZE_RGB, sky).round().astype(np.uint8)

    def render(self, scene: sc.Scene, t_us: int, boxes: list[Box] | None = None) -> np.ndarray:
        """RGB uint8 [H, W, 3] at time t_us."""
        img = self.background.copy()
        ex, ey, eyaw = (float(v) for v in scene.ego_pose(t_us))
        c, s = np.float32(np.cos(eyaw)), np.float32(np.sin(eyaw))
        wx = self.gx * c - self.gy * s + np.float32(ex)
        wy = self.gx * s + self.gy * c + np.float32(ey)
        classes = self.texture.lookup(wx, wy)
        img.reshape(-1, 3)[self.ground_index] = self.palette[self.band_offset + classes]
        if boxes is None:
            boxes = scene_boxes(scene, t_us)
        self._draw_boxes(img, boxes, ex, ey, eyaw)
        return img

    def _draw_boxes(self, img, boxes, ex, ey, eyaw) -> None:
        """Project every camera-facing box face at once, then fill the visible ones far to near."""
        if not boxes:
            return
        cam = self.camera
        k = cam.intrinsics
        c, s = np.cos(eyaw), np.sin(eyaw)
        cam_world = np.array([ex + c * cam.translation[0] - s * cam.translation[1],
                              ey + s * cam.translation[0] + c * cam.translation[1], cam.translation[2]])
        centers = np.array([b.center for b in boxes])
        near = np.hypot(centers[:, 0] - cam_world[0], centers[:, 1] - cam_world[1]) < MAX_RANGE
        if not near.any():
            return
        boxes = [b for b, keep in zip(boxes, near) if keep]
        centers = centers[near]
        yaw = np.array([b.yaw for b in boxes])
        size = np.array([b.size for b in boxes])
        colors = np.array([b.color for b in boxes], dtype=np.float64)
        cb, sb = np.cos(yaw), np.sin(yaw)
        rot = np.zeros((len(boxes), 3, 3))
        rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = cb, -sb, sb, cb, 1.0
        corners = np.einsum("bij,bkj->bki", rot, _CORNERS[None] * size[:, None]) + centers[:, None]  # [B, 8, 3]
        quads = corners[:, _FACE_IDX]  # [B, 6, 4, 3]
        normals = np.einsum("bij,fj->bfi", rot, _FACE_NORMALS)  # [B, 6, 3]
        face_centers = quads.mean(axis=2)
        facing = np.einsum("bfi,bfi->bf", normals, cam_world - face_centers) > 0
        quads, normals, face_centers = quads[facing], normals[facing], face_centers[facing]  # [F, ...]
        if len(quads) == 0:
            return
        face_colors = np.repeat(colors[:, None], 6, axis=1)[facing]
        shade = 0.62 + 0.38 * np.clip(normals @ _SUN, 0.0, None)
        face_colors = np.clip(face_colors * shade[:, None], 0, 255).astype(np.uint8)
        nxt = np.roll(quads, -1, axis=1)
        polys = (quads[:, :, None] + (nxt - quads)[:, :, None] * _EDGE_STEPS[None, None, :, None]).reshape(len(quads), -1, 3)
        # World -> rig (inverse ego pose) -> camera -> pixels.
        rel = polys - np.array([ex, ey, 0.0])
        rig = np.stack([c * rel[..., 0] + s * rel[..., 1], -s * rel[..., 0] + c * rel[..., 1], rel[..., 2]], -1)
        cam_pts = cam.rig_to_camera(rig)
        theta = np.arccos(np.clip(cam_pts[..., 2] / np.linalg.norm(cam_pts, axis=-1), -1, 1))
        pix = k.ray_to_pixel(cam_pts)
        # Faces partly behind the camera are dropped rather than clipped; so are faces off the image.
        ok = np.all(theta < min(k.max_theta, np.radians(100)), axis=1)
        ok &= (pix[..., 0].max(1) >= 0) & (pix[..., 0].min(1) <= k.width - 1)
        ok &= (pix[..., 1].max(1) >= 0) & (pix[..., 1].min(1) <= k.height - 1)
        dist = np.linalg.norm(face_centers - cam_world, axis=1)
        for f in np.flatnonzero(ok)[np.argsort(-dist[ok], kind="stable")]:
            fill_polygon(img, pix[f], face_colors[f])


def fill_polygon(img: np.ndarray, pts: np.ndarray, color) -> None:
    """Fill the polygon `pts` [N, 2] (x, y pixel coordinates, pixel centres at integers) in place.

    Scanline fill between the leftmost and rightmost edge crossing of each row: exact for convex
    polygons, which projected box faces are up to the lens' slight bending.
    """
    h, w = img.shape[:2]
    xs, ys = pts[:, 0], pts[:, 1]
    y_lo = max(0, int(np.ceil(ys.min())))
    y_hi = min(h - 1, int(np.floor(ys.max())))
    if y_lo > y_hi:
        return
    rows = np.arange(y_lo, y_hi + 1, dtype=np.float64)[:, None]
    x0, y0 = xs[None], ys[None]
    x1, y1 = xs[_NEXT[len(xs)]][None], ys[_NEXT[len(xs)]][None]
    crosses = (y0 <= rows) != (y1 <= rows)  # the edge spans this row (half-open on both ends)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = x0 + (rows - y0) * (x1 - x0) / (y1 - y0)
    left = np.where(crosses, x, np.inf).min(axis=1)
    right = np.where(crosses, x, -np.inf).max(axis=1)
    x_lo = max(0, int(np.ceil(left.min())))
    x_hi = min(w - 1, int(np.floor(right.max())))
    if x_lo > x_hi:
        return
    cols = np.arange(x_lo, x_hi + 1, dtype=np.float64)[None]
    mask = (cols >= left[:, None]) & (cols <= right[:, None])
    img[y_lo:y_hi + 1, x_lo:x_hi + 1][mask] = color


_NEXT = {n: np.roll(np.arange(n), -1) for n in range(3, 33)}

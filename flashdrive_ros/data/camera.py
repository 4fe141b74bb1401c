"""Camera models for the synthetic rig: f-theta intrinsics, rig extrinsics, projection.

Conventions follow the PhysicalAI-AV calibration (dataset.md §6):
- camera frame: x right, y down, z forward;
- rig frame: origin at the rear-axle centre on the ground, x forward, y left, z up;
- extrinsics give the camera pose in the rig frame: p_rig = R @ p_cam + t;
- f-theta: theta = angle between ray and optical axis, r = sum_i fw_poly[i] * theta**i,
  pixel = (cx, cy) + r * (x, y) / |(x, y)|.  bw_poly is the fitted inverse r -> theta.
- pixel coordinates are continuous with integer values at pixel centres (column j, row i = (j, i)).

The projection code here is the same arithmetic as the devkit's FThetaCameraModel, so an image rendered
with these models is reproduced point for point by `physical_ai_av` reading the written calibration.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy.spatial.transform import Rotation

# Camera order used everywhere in the repo (Alpamayo indices 0, 1, 2, 6).
CAMERA_NAMES = (
    "camera_cross_left_120fov",
    "camera_front_wide_120fov",
    "camera_cross_right_120fov",
    "camera_front_tele_30fov",
)
ALPAMAYO_CAMERA_INDEX = {name: index for name, index in zip(CAMERA_NAMES, (0, 1, 2, 6))}

# Rig mounting (x, y, z in m; yaw left-positive and pitch down-positive in degrees) and horizontal FOV.
# Roughly a sedan with cameras behind the windshield and at the A-pillars.
_MOUNTS = {
    "camera_cross_left_120fov": dict(xyz=(2.1, 0.85, 1.35), yaw=60.0, pitch=6.0, hfov=120.0),
    "camera_front_wide_120fov": dict(xyz=(1.75, 0.0, 1.45), yaw=0.0, pitch=4.0, hfov=120.0),
    "camera_cross_right_120fov": dict(xyz=(2.1, -0.85, 1.35), yaw=-60.0, pitch=6.0, hfov=120.0),
    "camera_front_tele_30fov": dict(xyz=(1.75, 0.1, 1.45), yaw=0.0, pitch=1.0, hfov=30.0),
}

# Mild barrel term of the forward polynomial relative to the linear one: r = f*(theta + K3*theta**3).
_K3 = -0.04


@dataclasses.dataclass(frozen=True)
class FTheta:
    """f-theta intrinsics with degree-4 forward (theta -> r) and backward (r -> theta) polynomials."""

    width: int
    height: int
    cx: float
    cy: float
    fw_poly: tuple[float, ...]
    bw_poly: tuple[float, ...]
    max_theta: float  # largest angle (rad) over which the polynomials are valid and monotone

    def ray_to_pixel(self, rays: np.ndarray) -> np.ndarray:
        """Camera-frame rays [..., 3] -> pixels [..., 2] (same formula as the devkit)."""
        rays = np.asarray(rays, dtype=np.float64)
        norm = np.linalg.norm(rays, axis=-1)
        theta = np.arccos(np.clip(rays[..., 2] / norm, -1.0, 1.0))
        r = np.polynomial.polynomial.polyval(theta, self.fw_poly)
        rho = np.linalg.norm(rays[..., :2], axis=-1)
        # On the optical axis the direction is undefined but r == 0: any unit vector will do.
        scale = np.where(rho > 0, r / np.where(rho > 0, rho, 1.0), 0.0)
        return np.stack([self.cx + scale * rays[..., 0], self.cy + scale * rays[..., 1]], axis=-1)

    def pixel_to_ray(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [..., 2] -> unit camera-frame rays, inverting the forward polynomial exactly.

        Newton iterations on fw_poly (not the fitted bw_poly) so that rendering and ray_to_pixel agree
        to far below a pixel.
        """
        pixels = np.asarray(pixels, dtype=np.float64)
        px = pixels[..., 0] - self.cx
        py = pixels[..., 1] - self.cy
        r = np.hypot(px, py)
        theta = np.polynomial.polynomial.polyval(r, self.bw_poly)
        dfw = np.polynomial.polynomial.polyder(self.fw_poly)
        for _ in range(4):
            f = np.polynomial.polynomial.polyval(theta, self.fw_poly) - r
            theta = theta - f / np.polynomial.polynomial.polyval(theta, dfw)
        sin_t = np.sin(theta)
        safe_r = np.where(r > 0, r, 1.0)
        return np.stack([sin_t * px / safe_r, sin_t * py / safe_r, np.cos(theta)], axis=-1)

    def to_row(self) -> dict:
        """One row of the camera_intrinsics parquet."""
        row = {"width": int(self.width), "height": int(self.height), "cx": self.cx, "cy": self.cy}
        row.update({f"bw_poly_{i}": float(c) for i, c in enumerate(self.bw_poly)})
        row.update({f"fw_poly_{i}": float(c) for i, c in enumerate(self.fw_poly)})
        return row


def ftheta_for_fov(hfov_deg: float, width: int, height: int) -> FTheta:
    """f-theta model whose horizontal field of view spans `hfov_deg` across `width` pixels."""
    if width <= 0 or height <= 0:
        raise ValueError(f"camera resolution must be positive, got {width}x{height}")
    if not 1.0 <= hfov_deg <= 200.0:
        raise ValueError(f"horizontal FOV must be in [1, 200] degrees, got {hfov_deg}")
    half = np.radians(hfov_deg) / 2
    focal = (width / 2) / (half + _K3 * half**3)
    fw = (0.0, focal, 0.0, focal * _K3, 0.0)
    # Principal point slightly off-centre, as in real calibrations.
    cx = (width - 1) / 2 + 0.004 * width
    cy = (height - 1) / 2 - 0.003 * height
    # Valid up to the image corners plus margin, and never past the forward polynomial's turning point.
    corner_r = np.hypot(max(cx, width - cx), max(cy, height - cy))
    theta_turn = np.sqrt(-1.0 / (3 * _K3))
    theta_grid = np.linspace(0.0, min(theta_turn * 0.95, np.pi * 0.75), 2000)
    r_grid = np.polynomial.polynomial.polyval(theta_grid, fw)
    max_theta = float(theta_grid[-1])
    if r_grid[-1] < corner_r:
        raise ValueError(f"FOV {hfov_deg} deg cannot cover a {width}x{height} image with this model")
    # Backward polynomial: least-squares fit theta(r) with zero constant term over the used range.
    use = r_grid <= corner_r * 1.2
    powers = np.stack([r_grid[use] ** k for k in range(1, 5)], axis=1)
    coeffs, *_ = np.linalg.lstsq(powers, theta_grid[use], rcond=None)
    bw = (0.0, *map(float, coeffs))
    return FTheta(width, height, float(cx), float(cy), tuple(map(float, fw)), bw, max_theta)


@dataclasses.dataclass(frozen=True)
class Camera:
    """One rig camera: intrinsics and its pose in the rig frame."""

    name: str
    intrinsics: FTheta
    rotation: np.ndarray  # [3, 3] rig_from_camera
    translation: np.ndarray  # [3] camera origin in the rig frame

    @property
    def quaternion(self) -> np.ndarray:
        """(qx, qy, qz, qw) of rig_from_camera, the extrinsics parquet convention."""
        return Rotation.from_matrix(self.rotation).as_quat()

    def rig_to_camera(self, points_rig: np.ndarray) -> np.ndarray:
        """Rig-frame points [..., 3] -> camera-frame points."""
        return (np.asarray(points_rig, dtype=np.float64) - self.translation) @ self.rotation

    def project(self, points_rig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rig-frame points [..., 3] -> (pixels [..., 2], visible [...] bool).

        visible: in front of the camera within the model's valid angle and inside the image.
        """
        cam = self.rig_to_camera(points_rig)
        pixels = self.intrinsics.ray_to_pixel(cam)
        theta = np.arccos(np.clip(cam[..., 2] / np.linalg.norm(cam, axis=-1), -1.0, 1.0))
        k = self.intrinsics
        inside = (
            (pixels[..., 0] >= -0.5) & (pixels[..., 0] < k.width - 0.5)
            & (pixels[..., 1] >= -0.5) & (pixels[..., 1] < k.height - 0.5)
        )
        return pixels, (theta < k.max_theta) & inside


def camera_rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """rig_from_camera rotation for a camera yawed left by yaw and pitched down by pitch."""
    # Camera axes expressed in the rig frame for a forward-looking camera: x_cam -> -y, y_cam -> -z, z_cam -> x.
    base = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    # Pitch down = positive rotation about the rig y axis (x tilts toward -z), then yaw about z.
    return Rotation.from_euler("ZY", [yaw_deg, pitch_deg], degrees=True).as_matrix() @ base


def default_rig(width: int, height: int) -> dict[str, Camera]:
    """The four Alpamayo cameras at `width` x `height`, in CAMERA_NAMES order."""
    rig = {}
    for name in CAMERA_NAMES:
        m = _MOUNTS[name]
        rig[name] = Camera(
            name=name,
            intrinsics=ftheta_for_fov(m["hfov"], width, height),
            rotation=camera_rotation(m["yaw"], m["pitch"]),
            translation=np.array(m["xyz"], dtype=np.float64),
        )
    return rig

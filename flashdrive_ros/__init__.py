"""flashdrive_ros: real-time reasoning VLA driving models (Alpamayo 1.5 architecture) for ROS 2.

The generated message module (flashdrive_ros.msg) is produced by colcon in install/; extending the
package path lets the source tree and the installed messages form one package, so editing the Python
sources needs no rebuild.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"

"""The bash kernel kiln runs: ``bash_kernel``, with a complete kernel_info.

Usage: ``python -m kiln_kernel.bash -f CONNECTION_FILE``

``bash_kernel`` (ipykernel driving one bash through a pseudo-terminal, as a
notebook with the bash kernel shows it) leaves ``language_info.version``
out of its ``kernel_info_reply``, which the Jupyter protocol requires and
kiln's client checks; this subclass adds it (bash's own version) and
changes nothing else.
"""

from bash_kernel.kernel import BashKernel


class KilnBashKernel(BashKernel):
    @property
    def language_info(self):
        return dict(BashKernel.language_info, version=self.language_version)


def main():
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(kernel_class=KilnBashKernel)


if __name__ == "__main__":
    main()

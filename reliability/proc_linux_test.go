package reliability

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes a publisher process die with the suite, so that a
// suite killed by a timeout leaves no publisher behind.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

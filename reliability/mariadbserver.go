package reliability

import (
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "gorm.io/driver/mysql" // the "mysql" database/sql driver
)

// MariaDBServer is a private MariaDB instance made with mariadb-install-db
// and run with mariadbd from the installed MariaDB, so that a scenario can
// restart it without disturbing the shared server.
type MariaDBServer struct {
	bin, dir string
	Port     int
	cmd      *exec.Cmd
	exited   chan struct{}
}

// StartMariaDB creates and starts an instance in a new temporary directory,
// with an empty database named test.
func StartMariaDB() (*MariaDBServer, error) {
	bin, err := exec.LookPath("mariadbd")
	if err != nil {
		if bin, err = exec.LookPath("/usr/sbin/mariadbd"); err != nil {
			return nil, fmt.Errorf("mariadbd not found (install MariaDB's server package)")
		}
	}
	install, err := exec.LookPath("mariadb-install-db")
	if err != nil {
		return nil, fmt.Errorf("mariadb-install-db not found (install MariaDB's server package)")
	}
	dir, err := os.MkdirTemp("", "outbox-mariadb")
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	s := &MariaDBServer{bin: bin, dir: dir, Port: port}
	args := []string{"--no-defaults", "--datadir=" + filepath.Join(dir, "data"),
		"--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"}
	if u := s.user(); u != "" {
		args = append(args, "--user="+u)
	}
	cmd := exec.Command(install, args...)
	if out, err := cmd.CombinedOutput(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("mariadb-install-db: %w: %s", err, out)
	}
	if err := s.Start(); err != nil {
		s.Remove()
		return nil, err
	}
	db, err := sql.Open("mysql", fmt.Sprintf("root@tcp(127.0.0.1:%d)/", s.Port))
	if err == nil {
		_, err = db.Exec("CREATE DATABASE test")
		_ = db.Close()
	}
	if err != nil {
		s.Remove()
		return nil, fmt.Errorf("creating the test database: %w", err)
	}
	return s, nil
}

// user is the account mariadbd runs as: it refuses root unless told to.
func (s *MariaDBServer) user() string {
	if os.Geteuid() == 0 {
		return "root"
	}
	return ""
}

// DSN connects to the instance's test database.
func (s *MariaDBServer) DSN() string {
	return fmt.Sprintf("root@tcp(127.0.0.1:%d)/test?parseTime=true&loc=UTC", s.Port)
}

// Start starts the server and waits until it accepts connections.
func (s *MariaDBServer) Start() error {
	args := []string{"--no-defaults", "--datadir=" + filepath.Join(s.dir, "data"), "--port=" + strconv.Itoa(s.Port),
		"--bind-address=127.0.0.1", "--socket=" + filepath.Join(s.dir, "sock"), "--pid-file=" + filepath.Join(s.dir, "pid"),
		"--log-error=" + filepath.Join(s.dir, "log"), "--skip-name-resolve", "--skip-log-bin", "--max-connections=300",
		"--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=2"}
	if u := s.user(); u != "" {
		args = append(args, "--user="+u)
	}
	cmd := exec.Command(s.bin, args...)
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("mariadbd: %w", err)
	}
	s.cmd, s.exited = cmd, make(chan struct{})
	go func(done chan struct{}) { _ = cmd.Wait(); close(done) }(s.exited)
	db, err := sql.Open("mysql", fmt.Sprintf("root@tcp(127.0.0.1:%d)/", s.Port))
	if err != nil {
		return err
	}
	defer db.Close()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-s.exited:
			return fmt.Errorf("mariadbd exited at start: %s", s.logTail())
		default:
		}
		if err := db.Ping(); err == nil {
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("mariadbd did not accept connections within 60s: %w: %s", err, s.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop stops the server (SIGTERM: a normal shutdown, in which open
// transactions roll back and connections are cut) and waits for it.
func (s *MariaDBServer) Stop() error {
	if s.cmd == nil {
		return errors.New("mariadbd is not running")
	}
	cmd, exited := s.cmd, s.exited
	s.cmd = nil
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return nil
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("mariadbd did not stop within 60s of SIGTERM")
	}
}

// Remove stops the server and deletes its files.
func (s *MariaDBServer) Remove() {
	if s.cmd != nil {
		_ = s.Stop()
	}
	_ = os.RemoveAll(s.dir)
}

func (s *MariaDBServer) logTail() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "log"))
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-5):], "\n")
}

package outbox_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// TestDocsSnippetsCompile builds every ```go block of README.md and
// docs/*.md, so that what a reader pastes compiles against the code as it
// is. A block is one of three kinds:
//
//   - a complete file (it starts with "package"): built as it is;
//   - declarations (types, functions, an import block): built in a package
//     of their own beside docsPrelude;
//   - statements: wrapped in a function returning error, beside docsPrelude.
//
// Fragments get the imports their unresolved package names need
// (docsImports) and the variables the docs take as given (db, ctx,
// brokers...) from docsPrelude. The files are given to go build as an
// overlay, so nothing is written to the work tree, and //line directives
// make every error point at the markdown file and line.
func TestDocsSnippetsCompile(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the docs' snippets: %v", err)
	}
	root := moduleRoot(t, goTool)
	docs, _ := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	files := append([]string{filepath.Join(root, "README.md")}, docs...)

	tmp := t.TempDir()
	overlay := map[string]string{}
	var pkgs []string
	var count int
	mains := false
	for _, file := range files {
		rel, _ := filepath.Rel(root, file)
		rel = filepath.ToSlash(rel)
		blocks, err := goBlocks(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range blocks {
			src, err := snippetFile(rel, b)
			if err != nil {
				t.Errorf("%s:%d: %v", rel, b.line, err)
				continue
			}
			count++
			mains = mains || strings.HasPrefix(src, fmt.Sprintf("//line %s:%d\npackage main", rel, b.line))
			dir := filepath.Join(root, "_docsnippets", fmt.Sprintf("s%03d", count))
			real := filepath.Join(tmp, fmt.Sprintf("s%03d.go", count))
			if err := os.WriteFile(real, []byte(src), 0o644); err != nil {
				t.Fatal(err)
			}
			overlay[filepath.Join(dir, "snippet.go")] = real
			pkgs = append(pkgs, "./"+filepath.ToSlash(filepath.Join("_docsnippets", fmt.Sprintf("s%03d", count))))
		}
	}
	if count == 0 {
		t.Fatal("no ```go block found in README.md or docs/*.md")
	}
	o, _ := json.Marshal(map[string]any{"Replace": overlay})
	overlayFile := filepath.Join(tmp, "overlay.json")
	if err := os.WriteFile(overlayFile, o, 0o644); err != nil {
		t.Fatal(err)
	}
	// Packages other than main are compiled and discarded; the complete
	// programs' binaries land in tmp (go build refuses -o without one).
	args := []string{"build", "-overlay", overlayFile}
	if mains {
		args = append(args, "-o", tmp+string(filepath.Separator))
	}
	cmd := exec.Command(goTool, append(args, pkgs...)...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("a snippet of the docs does not compile (%v):\n%s", err, out)
	}
	t.Logf("built %d snippets from %d files", count, len(files))
}

// moduleRoot is the directory of the module this test belongs to.
func moduleRoot(t *testing.T, goTool string) string {
	out, err := exec.Command(goTool, "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(out)) == "" || strings.TrimSpace(string(out)) == os.DevNull {
		t.Fatalf("cannot find the module's go.mod: %v %s", err, out)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// goBlock is one ```go block: its text, without the fence's indentation,
// and the line of its first line in the markdown file.
type goBlock struct {
	line int
	text string
}

func goBlocks(path string) ([]goBlock, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var blocks []goBlock
	var cur *goBlock
	var indent string
	var lines []string
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		switch {
		case cur == nil && trimmed == "```go":
			cur = &goBlock{line: n + 1}
			indent = line[:len(line)-len(strings.TrimLeft(line, " \t"))]
			lines = nil
		case cur != nil && trimmed == "```":
			cur.text = strings.Join(lines, "\n") + "\n"
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			lines = append(lines, strings.TrimPrefix(line, indent))
		}
	}
	if cur != nil {
		return nil, fmt.Errorf("%s:%d: a ```go block is not closed", path, cur.line-1)
	}
	return blocks, sc.Err()
}

// snippetFile turns a block into a Go file, as the test's doc comment says.
func snippetFile(name string, b goBlock) (string, error) {
	at := func(line int) string { return fmt.Sprintf("//line %s:%d\n", name, line) }
	if strings.HasPrefix(strings.TrimSpace(b.text), "package ") {
		return at(b.line) + b.text, nil
	}
	fset := token.NewFileSet()
	if f, err := parser.ParseFile(fset, "", "package snippet\n"+b.text, 0); err == nil {
		// Declarations. The block's own import declarations come first; in
		// the parsed source, line L is the block's line L-1.
		imports, rest, restLine := "", b.text, b.line
		var lastImport ast.Decl
		for _, d := range f.Decls {
			if g, ok := d.(*ast.GenDecl); ok && g.Tok == token.IMPORT {
				lastImport = d
			}
		}
		if lastImport != nil {
			k := fset.Position(lastImport.End()).Line - 1
			lines := strings.SplitAfter(b.text, "\n")
			imports = at(b.line) + strings.Join(lines[:k], "")
			rest, restLine = strings.Join(lines[k:], ""), b.line+k
		}
		return assemble(imports, docsPreludeFor(f)+at(restLine)+rest, f)
	}
	// Statements: a function body; a block that ends on a return needs no other.
	f, err := parser.ParseFile(fset, "", "package snippet\nfunc snippet() error {\n"+b.text+"}\n", 0)
	if err != nil {
		return "", fmt.Errorf("neither declarations nor statements: %w", err)
	}
	end := "return nil\n"
	if list := f.Decls[0].(*ast.FuncDecl).Body.List; len(list) > 0 {
		if _, ok := list[len(list)-1].(*ast.ReturnStmt); ok {
			end = ""
		}
	}
	return assemble("", docsPreludeFor(nil)+"func snippet() error {\n"+at(b.line)+b.text+end+"}\n", nil)
}

// assemble puts a file together: the package clause, the snippet's own
// imports, the imports of the package names code uses without declaring or
// importing them, then code.
func assemble(imports, code string, own *ast.File) (string, error) {
	f, err := parser.ParseFile(token.NewFileSet(), "", "package snippet\n"+imports+code, 0)
	if err != nil {
		return "", err
	}
	have := map[string]bool{}
	if own != nil {
		for _, imp := range own.Imports {
			p := strings.Trim(imp.Path.Value, `"`)
			name := p[strings.LastIndex(p, "/")+1:]
			if imp.Name != nil {
				name = imp.Name.Name
			}
			have[name] = true
		}
	}
	var paths []string
	seen := map[string]bool{}
	for _, id := range f.Unresolved {
		if p, ok := docsImports[id.Name]; ok && !have[id.Name] && !seen[p] {
			seen[p] = true
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	var b strings.Builder
	b.WriteString("package snippet\n")
	b.WriteString(imports)
	for _, p := range paths {
		fmt.Fprintf(&b, "import %q\n", p)
	}
	b.WriteString(code)
	return b.String(), nil
}

// docsImports are the package names the docs use without an import block.
var docsImports = map[string]string{
	"outbox":      "github.com/gorm-outbox/outbox",
	"kafka":       "github.com/gorm-outbox/outbox/kafka",
	"hooks":       "github.com/gorm-outbox/outbox/hooks",
	"inbox":       "github.com/gorm-outbox/outbox/inbox",
	"outboxtest":  "github.com/gorm-outbox/outbox/outboxtest",
	"pgxpipeline": "github.com/gorm-outbox/outbox/pgxpipeline",
	"gorm":        "gorm.io/gorm",
	"postgres":    "gorm.io/driver/postgres",
	"mysql":       "gorm.io/driver/mysql",
	"sqlite":      "github.com/glebarez/sqlite",
	"sarama":      "github.com/IBM/sarama",
	"uuid":        "github.com/google/uuid",
	"context":     "context",
	"errors":      "errors",
	"json":        "encoding/json",
	"fmt":         "fmt",
	"log":         "log",
	"slog":        "log/slog",
	"os":          "os",
	"signal":      "os/signal",
	"strconv":     "strconv",
	"strings":     "strings",
	"time":        "time",
	"tls":         "crypto/tls",
	"sql":         "database/sql",
}

// docsPrelude is what the docs' fragments take as given, one declaration
// each: a snippet that declares the same name keeps its own.
var docsPrelude = []struct{ name, decl string }{
	{"db", "var db *gorm.DB"},
	{"ctx", "var ctx = context.Background()"},
	{"brokers", `var brokers = []string{"localhost:9092"}`},
	{"dsn", `var dsn = "host=127.0.0.1 user=postgres dbname=app sslmode=disable"`},
	{"user", `var user, password = "app", "secret"`},
	{"sender", "var sender outbox.Sender"},
	{"store", "var store *outbox.GormStore"},
	{"Order", "type Order struct {\n\tID       uint\n\tCustomer string\n\tStatus   string\n}"},
	{"Invoice", "type Invoice struct {\n\tID      uint\n\tOrderID string\n\tCents   int64\n}"},
}

// docsPreludeFor returns docsPrelude without the names f declares.
func docsPreludeFor(f *ast.File) string {
	declared := map[string]bool{}
	if f != nil {
		for name := range f.Scope.Objects {
			declared[name] = true
		}
	}
	var b strings.Builder
	for _, p := range docsPrelude {
		if !declared[p.name] {
			b.WriteString(p.decl + "\n")
		}
	}
	return b.String()
}

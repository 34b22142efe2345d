"""Source rewrite that lets unchanged CUDA sources compile with g++ for the
SIMT CPU emulator (see README.md).

Rewrites (comments and string literals are left alone, line numbers kept):
  * ``kern<<<g, b[, smem[, stream]]>>>(args)``  ->
    ``::simt::launcher(kern, "kern", g, b[, smem[, stream]])(args)``
    (``kern`` may be qualified ``ns::k``, templated ``k<T, 4>`` or parenthesised)
  * ``extern __shared__ T name[];`` -> ``T* const name = ::simt::dyn_smem<T>();``
    inside a function, or a ``#define name (::simt::dyn_smem<T>())`` at namespace
    scope (all dynamic shared arrays alias one 16-byte aligned per-launch buffer)
  * ``static __shared__`` -> ``__shared__`` (``__shared__`` expands to ``static``)
  * after a function-scope ``__shared__ T a[N], b;`` a call poisoning a and b
    (0xff bytes) when the first thread of each block reaches the declaration, and
    registering them (by name) with the memory checker
"""
from __future__ import annotations

import re

__all__ = ["rewrite_source", "mask_source", "launched_kernel_names", "kernel_base_name", "strip_parameters"]


def mask_source(src: str) -> str:
    """Return src with comments, string and char literals blanked (same length,
    newlines kept) so that pattern matching cannot hit them."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = src[i]
        if c == "/" and i + 1 < n and src[i + 1] == "/":
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif c == "/" and i + 1 < n and src[i + 1] == "*":
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == 'R' and src.startswith('R"', i) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'R"([^()\\\s]{0,16})\(', src[i:])
            if not m:
                i += 1
                continue
            end = src.find(")" + m.group(1) + '"', i + m.end())
            j = n if end < 0 else end + len(m.group(1)) + 2
            blank(i + 1, j)
            i = j
        elif c in "\"'":
            if c == "'" and i > 0 and (src[i - 1].isalnum()) and i + 1 < n and src[i + 1].isalnum():
                i += 1  # digit separator 1'000
                continue
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            blank(i + 1, j - 1)
            i = j
        else:
            i += 1
    return "".join(out)


_IDENT = re.compile(r"[A-Za-z_]\w*")


def _kernel_start(m: str, end: int) -> int:
    """Given masked text and the index just past the kernel expression (where
    '<<<' begins, after whitespace), return where the expression starts."""
    i = end
    while i > 0 and m[i - 1].isspace():
        i -= 1
    while True:
        if i > 0 and m[i - 1] in ">)":
            close, open_ = m[i - 1], "<" if m[i - 1] == ">" else "("
            depth = 0
            j = i - 1
            while j >= 0:
                if m[j] == close:
                    depth += 1
                elif m[j] == open_:
                    depth -= 1
                    if depth == 0:
                        break
                j -= 1
            if j < 0:
                raise ValueError("unbalanced kernel expression before <<<")
            i = j
            if open_ == "(":
                # a parenthesised expression: may itself be preceded by nothing else
                k = i
                while k > 0 and m[k - 1].isspace():
                    k -= 1
                if k > 0 and (m[k - 1].isalnum() or m[k - 1] == "_"):
                    i = k  # call-like f(...)<<<: keep scanning identifier
                else:
                    return i
            while i > 0 and m[i - 1].isspace():
                i -= 1
        # identifier
        j = i
        while j > 0 and (m[j - 1].isalnum() or m[j - 1] == "_"):
            j -= 1
        if j == i:
            return i
        i = j
        # qualifier '::'
        k = i
        while k > 0 and m[k - 1].isspace():
            k -= 1
        if k >= 2 and m[k - 2 : k] == "::":
            q = k - 2
            i = q
            while i > 0 and m[i - 1].isspace():
                i -= 1
            if i == 0 or not (m[i - 1].isalnum() or m[i - 1] in "_>"):
                return q  # leading '::'
            continue
        return i


def _rewrite_launches(src: str) -> str:
    out = []
    pos = 0
    m = mask_source(src)
    for mt in re.finditer(r"<<<", m):
        start_cfg = mt.end()
        if mt.start() < pos:
            continue
        end_cfg = m.find(">>>", start_cfg)
        if end_cfg < 0:
            raise ValueError("unterminated <<< ... >>> launch")
        k0 = _kernel_start(m, mt.start())
        kernel = src[k0 : mt.start()].strip()
        cfg = src[start_cfg:end_cfg]
        # keep newlines so line numbers stay right
        name = " ".join(kernel.split()).replace("\\", "\\\\").replace('"', '\\"')
        out.append(src[pos:k0])
        out.append(f'::simt::launcher({kernel}, "{name}", {cfg})')
        pos = end_cfg + 3
    out.append(src[pos:])
    return "".join(out)


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+((?:__align__\s*\(\s*\w+\s*\)\s*|alignas\s*\(\s*\w+\s*\)\s*|"
    r"__attribute__\s*\(\(.*?\)\)\s*)*)(?P<type>[^;\[\]]*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*"
    r"(?:__align__\s*\(\s*\w+\s*\)\s*|__attribute__\s*\(\(.*?\)\)\s*)*\[\s*\]\s*"
    r"(?:__align__\s*\(\s*\w+\s*\)\s*|__attribute__\s*\(\(.*?\)\)\s*)*;",
    re.S,
)
_ALIGN_IN_TYPE = re.compile(r"__align__\s*\(\s*\w+\s*\)|alignas\s*\(\s*\w+\s*\)|__attribute__\s*\(\(.*?\)\)")


def _scope_is_function(m: str, at: int) -> bool:
    """True if position `at` is inside a function/class body (not at namespace
    or extern "C" scope)."""
    stack = []
    i = 0
    for mt in re.finditer(r"[{}]", m[:at]):
        if mt.group() == "{":
            k = mt.start()
            head = m[max(0, k - 200) : k]
            cut = max(head.rfind(";"), head.rfind("}"), head.rfind("{"))
            head = head[cut + 1 :].strip()
            is_ns = bool(re.search(r"(^|\s)namespace(\s+[\w:]+)?\s*$", head)) or bool(
                re.search(r'extern\s*"[^"\n]*"\s*$', head)
            )
            stack.append(is_ns)
        else:
            if stack:
                stack.pop()
        i += 1
    return any(not s for s in stack)


def _rewrite_extern_shared(src: str) -> str:
    m = mask_source(src)
    out = []
    pos = 0
    for mt in _EXTERN_SHARED.finditer(m):
        typ = _ALIGN_IN_TYPE.sub(" ", src[mt.start("type") : mt.end("type")]).strip()
        typ = " ".join(typ.split())
        name = mt.group("name")
        text = src[mt.start() : mt.end()]
        nl = "\n" * text.count("\n")
        if _scope_is_function(m, mt.start()):
            rep = f"{typ}* const {name} = ::simt::dyn_smem<{typ}>();{nl}"
        else:
            # a macro (a namespace-scope pointer would be initialised only once);
            # #line keeps the following line numbers right
            line = src.count("\n", 0, mt.end()) + 1
            rep = f"\n#define {name} (::simt::dyn_smem<{typ}>())\n#line {line}\n"
        out.append(src[pos : mt.start()])
        out.append(rep)
        pos = mt.end()
    out.append(src[pos:])
    return "".join(out)


_ALIGN_ANY = re.compile(r"__align__\s*\(\s*\w+\s*\)|alignas\s*\(\s*\w+\s*\)")


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "<[(":
            depth += 1
        elif ch in ">])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _rewrite_static_shared(src: str) -> str:
    """After each function-scope ``__shared__ T a[..], b;`` append a call that
    poisons the variables when the first thread of a block reaches them (static
    shared memory would otherwise keep the previous block's/launch's values)."""
    m = mask_source(src)
    out = []
    pos = 0
    counter = 0
    for mt in re.finditer(r"\b__shared__\b([^;{}]*);", m):
        body = _ALIGN_ANY.sub(" ", m[mt.start(1) : mt.end(1)])
        if "=" in body or "(" in body or "extern" in m[max(0, mt.start() - 12) : mt.start()]:
            continue
        if not _scope_is_function(m, mt.start()):
            continue
        names = []
        for k, piece in enumerate(_split_top(body)):
            piece = piece.split("[", 1)[0].strip()
            idm = re.search(r"([A-Za-z_]\w*)\s*$", piece)
            if not idm or (k == 0 and piece == idm.group(1)):
                names = []
                break
            names.append(idm.group(1))
        if not names:
            continue
        extra = []
        for nm in names:
            counter += 1
            g = f"simt_sg_{counter}_"
            extra.append(f"static unsigned long long {g}; ::simt::shared_poison(&{nm}, sizeof({nm}), &{g}, \"{nm}\");")
        out.append(src[pos : mt.end()])
        out.append(" " + " ".join(extra))
        pos = mt.end()
    out.append(src[pos:])
    return "".join(out)


def strip_parameters(symbol: str) -> str:
    """A demangled function symbol without its trailing parameter list (``k<1>(int*)`` -> ``k<1>``)."""
    text = symbol.strip()
    if text.endswith(")") and not text.startswith("("):
        depth = 0
        for i in range(len(text) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(text[i], 0)
            if depth == 0:
                return text[:i]
    return text


def kernel_base_name(expr: str) -> str:
    """The function name of a kernel expression or of a demangled symbol: template arguments,
    parameter lists and namespace qualifiers removed (``ns::k<R, T>`` -> ``k``)."""
    text = strip_parameters(expr)
    prev = None
    while prev != text:  # innermost <...> first
        prev = text
        text = re.sub(r"<[^<>]*>", "", text)
    text = text.replace("(", " ").replace(")", " ").strip()
    return text.split("::")[-1].strip()


def launched_kernel_names(rewritten: str) -> set[str]:
    """Base names of the kernels launched in source text already passed through rewrite_source."""
    names = set()
    for m in re.finditer(r'::simt::launcher\((?:.*?), "((?:[^"\\]|\\.)*)"', rewritten, re.S):
        names.add(kernel_base_name(m.group(1).replace('\\"', '"')))
    return names


def rewrite_source(src: str, filename: str | None = None) -> str:
    """Rewrite CUDA source text for the emulator. If filename is given a
    ``#line 1 "filename"`` directive is prepended so diagnostics and
    __FILE__/source_location point at the original file."""
    m = mask_source(src)
    # `static __shared__` -> `__shared__` (which already means static)
    parts = []
    pos = 0
    for mt in re.finditer(r"\bstatic(\s+)__shared__\b", m):
        parts.append(src[pos : mt.start()])
        parts.append(" " * (len("static")) + src[mt.start(1) : mt.end()])
        pos = mt.end()
    parts.append(src[pos:])
    src = "".join(parts)
    src = _rewrite_extern_shared(src)
    src = _rewrite_static_shared(src)
    src = _rewrite_launches(src)
    if filename:
        esc = filename.replace("\\", "\\\\").replace('"', '\\"')
        src = f'#line 1 "{esc}"\n' + src
    return src


if __name__ == "__main__":  # pragma: no cover
    import sys

    for p in sys.argv[1:]:
        with open(p) as f:
            sys.stdout.write(rewrite_source(f.read(), p))

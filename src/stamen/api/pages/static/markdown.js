// `Stamen.renderMarkdown(text) -> DocumentFragment`: a tiny, safe renderer for model output.
//
// Model text is untrusted. It is never parsed as HTML: every piece of it reaches the page
// through `textContent` / text nodes, so `<script>` or `<img onerror=...>` in an answer is
// shown as those characters. A small subset of markdown becomes elements built with
// `createElement`: paragraphs (a single newline is a line break), fenced code blocks
// (```lang ... ```; an unclosed fence, as mid-stream, runs to the end), headings (# to
// ######, shown as h3-h6: an answer's title should not outrank the page's), bullet and
// numbered lists (one level), inline `code`, **bold**, *italics* / _italics_, and
// [text](target) links whose target is an http or https URL (anything else, e.g. javascript:,
// stays plain text). Links open in a new tab without a referrer.
"use strict";

(function () {
  const FENCE = /^\s*```\s*([\w+-]*)\s*$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  // One alternative per inline form; groups: 1-2 code, 3 bold, 4 italic (*), 5-6 italic
  // (_, 5 is the character before it), 7-8 link text and target.
  const INLINE =
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*(?=\S)([\s\S]*?\S)\*\*|\*(?=[^\s*])([^*]*?[^\s*])\*|(^|[^A-Za-z0-9_])_(?=\S)([^_]*?\S)_(?![A-Za-z0-9_])|\[([^\]\n]+)\]\(([^()\s]+)\)/g;

  function safeHref(target) {
    try {
      const url = new URL(target);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (_) {
      return null; // relative or malformed: not a link
    }
  }

  function link(text, target) {
    const href = safeHref(target);
    if (href === null) return document.createTextNode("[" + text + "](" + target + ")");
    const a = document.createElement("a");
    a.setAttribute("href", href);
    a.setAttribute("rel", "noopener noreferrer nofollow");
    a.setAttribute("target", "_blank");
    appendInline(a, text);
    return a;
  }

  function wrap(tag, text) {
    const node = document.createElement(tag);
    appendInline(node, text);
    return node;
  }

  function appendInline(parent, text) {
    const pattern = new RegExp(INLINE.source, "g"); // own lastIndex: this recurses
    let at = 0;
    for (let m = pattern.exec(text); m !== null; m = pattern.exec(text)) {
      let start = m.index;
      if (m[5] !== undefined) start += m[5].length; // the character before `_` is text
      if (start > at) parent.append(document.createTextNode(text.slice(at, start)));
      if (m[2] !== undefined) {
        const code = document.createElement("code");
        code.textContent = m[2];
        parent.append(code);
      } else if (m[3] !== undefined) {
        parent.append(wrap("strong", m[3]));
      } else if (m[4] !== undefined) {
        parent.append(wrap("em", m[4]));
      } else if (m[6] !== undefined) {
        parent.append(wrap("em", m[6]));
      } else {
        parent.append(link(m[7], m[8]));
      }
      at = pattern.lastIndex;
    }
    if (at < text.length) parent.append(document.createTextNode(text.slice(at)));
  }

  function paragraph(lines) {
    const p = document.createElement("p");
    lines.forEach((line, index) => {
      if (index) p.append(document.createElement("br"));
      appendInline(p, line);
    });
    return p;
  }

  function codeBlock(language, lines) {
    const pre = document.createElement("pre");
    const code = document.createElement("code");
    if (language) code.dataset.language = language;
    code.textContent = lines.join("\n");
    pre.append(code);
    return pre;
  }

  function renderMarkdown(text) {
    const out = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let paragraphLines = [];
    let list = null;
    const flush = () => {
      if (paragraphLines.length) out.append(paragraph(paragraphLines));
      paragraphLines = [];
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        flush();
        const body = [];
        for (i++; i < lines.length && !FENCE.test(lines[i]); i++) body.push(lines[i]);
        out.append(codeBlock(fence[1], body));
        continue;
      }
      const item = ITEM.exec(line);
      if (item) {
        if (paragraphLines.length) flush();
        const ordered = /\d/.test(item[1]);
        if (list === null || (list.tagName === "OL") !== ordered) {
          list = document.createElement(ordered ? "ol" : "ul");
          if (ordered && parseInt(item[1], 10) !== 1) list.setAttribute("start", String(parseInt(item[1], 10)));
          out.append(list);
        }
        list.append(wrap("li", item[2]));
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        flush();
        out.append(wrap("h" + Math.min(6, heading[1].length + 2), heading[2]));
        continue;
      }
      if (!line.trim()) {
        flush();
        continue;
      }
      if (list !== null && /^\s{2,}\S/.test(line)) {
        list.lastChild.append(document.createTextNode(" " + line.trim())); // a wrapped item
        continue;
      }
      list = null;
      paragraphLines.push(line);
    }
    flush();
    return out;
  }

  window.Stamen = Object.assign(window.Stamen || {}, { renderMarkdown });
})();

//! The `full` runtime profile: every documented package importable at once,
//! each heavy one really used, inside the sandbox, with no warnings, and the
//! documented examples working in it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of};

#[tokio::test(flavor = "multi_thread")]
async fn all_documented_packages_work_in_a_full_session() {
    let s = start(&["--profile", "full"]);
    let imports = kiln_runtime::FULL_IMPORTS.join(", ");
    let d = s.exec(&format!("import {imports}\nprint('all imported')"), None).await;
    assert_eq!(text_of(&d, "stdout"), "all imported\n", "{d}");
    assert_eq!(text_of(&d, "stderr"), "", "warnings on import: {d}");
    let id = d["session_id"].as_str().unwrap().to_string();

    let uses = [
        ("spacy", "import spacy\nprint([t.text for t in spacy.blank('en')('Hello kiln world')])", "['Hello', 'kiln', 'world']"),
        ("opencv", "import cv2, numpy as np\nimg = np.zeros((8, 6, 3), np.uint8)\nprint(cv2.cvtColor(cv2.GaussianBlur(img, (3, 3), 0), cv2.COLOR_BGR2GRAY).shape)", "(8, 6)"),
        ("librosa", "import librosa, numpy as np\ny = np.sin(2 * np.pi * 440 * np.arange(22050) / 22050).astype(np.float32)\nprint(round(float(librosa.feature.rms(y=y).mean()), 1), librosa.note_to_hz('A4'))", "0.7 440.0"),
        ("plotly", "import plotly.graph_objects as go\nprint('<div' in go.Figure(go.Bar(y=[1, 2])).to_html(include_plotlyjs=False))", "True"),
        ("bokeh", "from bokeh.plotting import figure\nfrom bokeh.embed import file_html\nfrom bokeh.resources import CDN\np = figure(); p.line([1, 2], [3, 4])\nprint('<html' in file_html(p, CDN))", "True"),
        ("sklearn", "from sklearn.linear_model import LinearRegression\nm = LinearRegression().fit([[0], [1], [2]], [1, 3, 5])\nprint(round(m.coef_[0], 3), round(m.intercept_, 3))", "2.0 1.0"),
        ("scipy", "from scipy import optimize\nprint(round(optimize.brentq(lambda x: x * x - 2, 0, 2), 4))", "1.4142"),
        ("sympy", "import sympy\nx = sympy.symbols('x')\nprint(sympy.integrate(x**2, x))", "x**3/3"),
        ("gensim", "from gensim.models import Word2Vec\nm = Word2Vec([['a', 'b', 'c']] * 20, vector_size=8, min_count=1, seed=1, workers=1)\nprint(m.wv['a'].shape)", "(8,)"),
        ("soundfile", "import soundfile, numpy as np\nsoundfile.write('t.wav', np.zeros(800), 8000)\nprint(soundfile.info('t.wav').duration)", "0.1"),
        ("textblob", "from textblob import TextBlob\nprint(TextBlob('kiln is great').sentiment.polarity > 0)", "True"),
        ("xarray", "import xarray as xr\nprint(int(xr.DataArray([1, 2, 3], dims='t').sum()))", "6"),
        ("docx+openpyxl", "import docx, openpyxl\nd = docx.Document(); d.add_paragraph('hi'); d.save('a.docx')\nwb = openpyxl.Workbook(); wb.active['A1'] = 7; wb.save('a.xlsx')\nprint(openpyxl.load_workbook('a.xlsx').active['A1'].value, len(docx.Document('a.docx').paragraphs))", "7 1"),
    ];
    for (name, code, want) in uses {
        let d = s.exec(code, Some(&id)).await;
        assert_eq!(text_of(&d, "error"), "", "{name}: {d}");
        assert_eq!(text_of(&d, "stdout").trim(), want, "{name}: {d}");
    }
    // seaborn draws a PNG through the inline backend.
    let d = s.exec("import seaborn as sns\nsns.histplot([1, 2, 2, 3]);", Some(&id)).await;
    assert!(
        d["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["type"] == "display_data" && o["data"]["image/png"].is_string()),
        "{d}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_documented_examples_work_in_a_full_session() {
    let s = start(&["--profile", "full"]);
    let url = s.url.clone();
    let repo = common::repo();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .arg(repo.join("tests/clients/seeds_curl.sh"))
            .env("KILN_BASE_URL", url)
            .env("KILN_API_KEY", common::KEY)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.lines().last().unwrap_or_default().ends_with(" 0 failed"), "{stdout}");
    drop(s);
}
